import { describe, expect, it } from "vitest";
import { describeModel, phaseFromServerStatus, StatusTracker } from "../src/status";

describe("StatusTracker", () => {
  it("shows loading, then ready with the last latency", () => {
    const s = new StatusTracker();
    s.setPhase("loading");
    expect(s.view().text).toContain("loading~spin");
    s.setPhase("ready", "tiny on cpu");
    expect(s.view().text).toBe("$(sparkle) maskfill");
    s.recordLatency(123.4);
    expect(s.view().text).toBe("$(sparkle) maskfill 123 ms");
    expect(s.view().tooltip).toContain("tiny on cpu");
  });

  it("flags errors with their message", () => {
    const s = new StatusTracker();
    s.setPhase("error", "Cannot find maskfill-lsp");
    expect(s.view()).toMatchObject({ isError: true, text: "$(error) maskfill" });
    expect(s.view().tooltip).toContain("Cannot find maskfill-lsp");
  });

  it("says when no server runs because maskfill is turned off", () => {
    const s = new StatusTracker();
    s.setPhase("off");
    expect(s.view()).toMatchObject({ isError: false, text: "$(circle-slash) maskfill off" });
    expect(s.view().tooltip).toContain("the server starts when it is turned on");
  });

  it("says when completions are off", () => {
    const s = new StatusTracker();
    s.setPhase("ready");
    s.enabled = false;
    expect(s.view().text).toBe("$(circle-slash) maskfill off");
  });
});

describe("phaseFromServerStatus", () => {
  it("maps the server's load states from maskfill/didChangeStatus", () => {
    expect(phaseFromServerStatus({ state: "ready", enabled: true, error: null })).toEqual({
      phase: "ready",
      detail: "",
    });
    expect(phaseFromServerStatus({ state: "loading" }).phase).toBe("loading");
    expect(phaseFromServerStatus({ state: "unloaded" }).phase).toBe("loading");
    expect(phaseFromServerStatus({ state: "closed" }).phase).toBe("stopped");
    expect(phaseFromServerStatus({ state: "failed", error: "cuda: out of memory" })).toEqual({
      phase: "error",
      detail: "cuda: out of memory",
    });
    expect(phaseFromServerStatus({ state: "failed", error: null }).detail).toBe("the model failed to load");
  });
});

describe("describeModel", () => {
  it("names the model, device and quantization from maskfill.status", () => {
    expect(describeModel({ model: "/m/dream", device: "cuda", quant: "int8" })).toBe(
      "/m/dream on cuda, int8",
    );
    expect(describeModel({ model: "/m/tiny", device: "cpu", quant: "none" })).toBe("/m/tiny on cpu");
    expect(describeModel(null)).toBe("");
    expect(describeModel({ model: null })).toBe("");
  });
});
