// Maps the extension's `maskfill.*` configuration to what the server reads. vscode-free.
//
// The server (lsp_server/settings.py) rejects unknown keys, so only its own keys are sent; the
// client-only keys (serverPath, trigger) stay here. Every server key is sent with its effective
// value (package.json carries the server's defaults): didChangeConfiguration merges onto the
// current settings, so a key the user removes must still arrive, with its default.

export const SERVER_SETTING_KEYS = [
  "enabled",
  "model",
  "device",
  "fallbackDevice",
  "quant",
  "maxTokens",
  "timeoutMs",
  "debounceMinMs",
  "debounceMaxMs",
  "contextLinesBefore",
  "contextLinesAfter",
  "contextTokens",
  "stopMode",
  "numCandidates",
  "languages",
  "cacheSize",
  "maxDocumentBytes",
  "engineMode",
  "engineEndpoint",
  "engineTokenFile",
  "engineCaFile",
  "engineIdleExitS",
  "contextReuse",
  "syntax",
  "extraContextTokens",
] as const;

export type ServerSettingKey = (typeof SERVER_SETTING_KEYS)[number];
export type Trigger = "automatic" | "manual";

export interface ClientSettings {
  serverPath: string;
  trigger: Trigger; // "manual": only explicitly invoked inline suggestions are shown
  enabled: boolean;
  server: Partial<Record<ServerSettingKey, unknown>>;
}

// `get` reads one key of the `maskfill` section (WorkspaceConfiguration.get in the extension).
export type ConfigGetter = (key: string) => unknown;

// Empty strings mean "unset" in the settings UI; the server's unset is null.
function normalise(key: ServerSettingKey, value: unknown): unknown {
  if ((key === "model" || key === "fallbackDevice") && value === "") return null;
  return value;
}

export function readSettings(get: ConfigGetter): ClientSettings {
  const server: Partial<Record<ServerSettingKey, unknown>> = {};
  for (const key of SERVER_SETTING_KEYS) {
    const value = get(key);
    if (value !== undefined) server[key] = normalise(key, value);
  }
  const serverPath = get("serverPath");
  return {
    serverPath: typeof serverPath === "string" ? serverPath : "",
    trigger: get("trigger") === "manual" ? "manual" : "automatic",
    enabled: get("enabled") !== false,
    server,
  };
}

// What goes into initializationOptions and workspace/didChangeConfiguration.
export function serverSettings(settings: ClientSettings): Record<string, unknown> {
  return { ...settings.server };
}

// Only the executable's location needs a new process; everything else the server applies live.
export function needsRestart(before: ClientSettings, after: ClientSettings): boolean {
  return before.serverPath !== after.serverPath;
}

// Inline suggestions the middleware lets through: none when disabled; only invoked ones in
// manual mode. triggerKind follows vscode.InlineCompletionTriggerKind (Invoke = 0, Automatic = 1).
export function allowsInlineRequest(settings: ClientSettings, triggerKind: number): boolean {
  if (!settings.enabled) return false;
  return settings.trigger === "automatic" || triggerKind === 0;
}

// The layers of `maskfill.enabled` that WorkspaceConfiguration.inspect reports. The setting is
// window-scoped (package.json gives no scope), so it has no folder or language values.
export interface EnabledLayers {
  defaultValue?: boolean;
  globalValue?: boolean;
  workspaceValue?: boolean;
}
export type ToggleScope = "global" | "workspace";

// Where the toggle writes and what: the negation of the effective value, in the most specific
// layer that sets it (writing a user value under a workspace value would change nothing).
export function toggledEnabled(layers: EnabledLayers | undefined): { scope: ToggleScope; value: boolean } {
  if (layers?.workspaceValue !== undefined) return { scope: "workspace", value: !layers.workspaceValue };
  const effective = layers?.globalValue ?? layers?.defaultValue ?? true;
  return { scope: "global", value: !effective };
}
