import { describe, expect, it } from "vitest";
import { phaseFromServerStatus, StatusTracker } from "../src/status";

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

  it("says when completions are off", () => {
    const s = new StatusTracker();
    s.setPhase("ready");
    s.enabled = false;
    expect(s.view().text).toBe("$(circle-slash) maskfill off");
  });
});

describe("phaseFromServerStatus", () => {
  it("maps the server's load states", () => {
    expect(phaseFromServerStatus({ loadState: "ready", model: "tiny", device: "cuda" })).toEqual({
      phase: "ready",
      detail: "tiny on cuda",
    });
    expect(phaseFromServerStatus({ loadState: "loading", model: "tiny", device: "cpu" }).phase).toBe("loading");
    expect(phaseFromServerStatus({ loadState: "unloaded" }).phase).toBe("loading");
    expect(phaseFromServerStatus({ loadState: "closed" }).phase).toBe("stopped");
    expect(phaseFromServerStatus({ loadState: "failed", error: "cuda: out of memory" })).toEqual({
      phase: "error",
      detail: "cuda: out of memory",
    });
  });

  it("treats an unreadable reply as still loading", () => {
    expect(phaseFromServerStatus(null).phase).toBe("loading");
    expect(phaseFromServerStatus("busy").phase).toBe("loading");
  });
});
