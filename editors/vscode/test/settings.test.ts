import * as fs from "node:fs";
import * as path from "node:path";
import { describe, expect, it } from "vitest";
import {
  allowsInlineRequest,
  needsRestart,
  readSettings,
  SERVER_SETTING_KEYS,
  serverSettings,
  toggledEnabled,
} from "../src/settings";

const manifest = JSON.parse(fs.readFileSync(path.join(__dirname, "..", "package.json"), "utf8"));
const properties: Record<string, { default: unknown }> = manifest.contributes.configuration.properties;

// What WorkspaceConfiguration.get returns when the user set nothing: package.json's defaults.
function defaults(overrides: Record<string, unknown> = {}) {
  return (key: string) => (key in overrides ? overrides[key] : properties[`maskfill.${key}`]?.default);
}

describe("readSettings / serverSettings", () => {
  it("sends every server key, with package.json's defaults, and no client-only key", () => {
    const sent = serverSettings(readSettings(defaults()));
    expect(Object.keys(sent).sort()).toEqual([...SERVER_SETTING_KEYS].sort());
    expect(sent).not.toHaveProperty("serverPath");
    expect(sent).not.toHaveProperty("trigger");
    expect(sent.model).toBeNull();
    expect(sent.maxTokens).toBe(properties["maskfill.maxTokens"].default);
  });

  it("declares exactly the server keys and the client-only keys in package.json", () => {
    // A setting in package.json but not in SERVER_SETTING_KEYS would never reach the server.
    const declared = Object.keys(properties).map((key) => key.replace(/^maskfill\./, ""));
    expect(declared.sort()).toEqual([...SERVER_SETTING_KEYS, "serverPath", "trigger"].sort());
  });

  it("passes the user's values through and maps empty strings to null", () => {
    const sent = serverSettings(
      readSettings(
        defaults({ model: "", fallbackDevice: "", device: "cuda:1", quant: "int8", languages: ["python"] }),
      ),
    );
    expect(sent).toMatchObject({
      model: null,
      fallbackDevice: null,
      device: "cuda:1",
      quant: "int8",
      languages: ["python"],
    });
  });

  it("keeps client-only settings on the client", () => {
    const s = readSettings(defaults({ serverPath: "/x/maskfill-lsp", trigger: "manual", enabled: false }));
    expect(s).toMatchObject({ serverPath: "/x/maskfill-lsp", trigger: "manual", enabled: false });
  });
});

describe("needsRestart", () => {
  it("restarts only when the executable changes", () => {
    const a = readSettings(defaults());
    expect(needsRestart(a, readSettings(defaults({ model: "/m" })))).toBe(false);
    expect(needsRestart(a, readSettings(defaults({ serverPath: "/other" })))).toBe(true);
  });
});

describe("allowsInlineRequest", () => {
  const INVOKE = 0;
  const AUTOMATIC = 1;
  it("lets everything through in automatic mode", () => {
    const s = readSettings(defaults());
    expect(allowsInlineRequest(s, AUTOMATIC)).toBe(true);
    expect(allowsInlineRequest(s, INVOKE)).toBe(true);
  });
  it("only lets invoked requests through in manual mode", () => {
    const s = readSettings(defaults({ trigger: "manual" }));
    expect(allowsInlineRequest(s, AUTOMATIC)).toBe(false);
    expect(allowsInlineRequest(s, INVOKE)).toBe(true);
  });
  it("blocks everything when disabled", () => {
    const s = readSettings(defaults({ enabled: false }));
    expect(allowsInlineRequest(s, INVOKE)).toBe(false);
  });
});

describe("toggledEnabled", () => {
  it("flips a workspace value in the workspace, whatever the user value", () => {
    const layers = { defaultValue: true, globalValue: true, workspaceValue: false };
    expect(toggledEnabled(layers)).toEqual({ scope: "workspace", value: true });
    expect(toggledEnabled({ ...layers, workspaceValue: true })).toEqual({ scope: "workspace", value: false });
  });
  it("flips the user value when no workspace sets one", () => {
    expect(toggledEnabled({ defaultValue: true, globalValue: false })).toEqual({ scope: "global", value: true });
  });
  it("starts from the default when nothing is set", () => {
    expect(toggledEnabled({ defaultValue: true })).toEqual({ scope: "global", value: false });
    expect(toggledEnabled(undefined)).toEqual({ scope: "global", value: false });
  });
  it("matches the manifest: maskfill.enabled is window-scoped, so it has no folder layer", () => {
    expect(properties["maskfill.enabled"]).not.toHaveProperty("scope");
  });
});
