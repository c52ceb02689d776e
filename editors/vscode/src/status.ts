// What the status bar item says. vscode-free: the extension copies `view()` onto the item.

// "off": maskfill.enabled is false, so no server was started in this window.
export type Phase = "off" | "starting" | "loading" | "ready" | "error" | "stopped";

export interface StatusView {
  text: string; // with a $(codicon) prefix
  tooltip: string;
  isError: boolean;
}

export class StatusTracker {
  phase: Phase = "starting";
  detail = "";
  enabled = true;
  lastLatencyMs: number | undefined;

  setPhase(phase: Phase, detail = ""): void {
    this.phase = phase;
    this.detail = detail;
  }

  // Round trip of the last inline request that returned a suggestion, as the editor saw it.
  recordLatency(ms: number): void {
    this.lastLatencyMs = ms;
  }

  view(): StatusView {
    const detail = this.detail ? `\n${this.detail}` : "";
    switch (this.phase) {
      case "off":
        return {
          text: "$(circle-slash) maskfill off",
          tooltip: "maskfill: turned off (maskfill.enabled); the server starts when it is turned on",
          isError: false,
        };
      case "starting":
        return {
          text: "$(loading~spin) maskfill",
          tooltip: `maskfill: starting the server${detail}`,
          isError: false,
        };
      case "loading":
        return {
          text: "$(loading~spin) maskfill",
          tooltip: `maskfill: loading the model${detail}`,
          isError: false,
        };
      case "error":
        return {
          text: "$(error) maskfill",
          tooltip: `maskfill: ${this.detail || "error"} (click for the log)`,
          isError: true,
        };
      case "stopped":
        return {
          text: "$(debug-stop) maskfill",
          tooltip: `maskfill: server stopped${detail}`,
          isError: false,
        };
      case "ready": {
        if (!this.enabled) {
          return {
            text: "$(circle-slash) maskfill off",
            tooltip: `maskfill: completions turned off${detail}`,
            isError: false,
          };
        }
        const latency = this.lastLatencyMs === undefined ? "" : ` ${Math.round(this.lastLatencyMs)} ms`;
        const last = this.lastLatencyMs === undefined ? "no completion yet" : `last completion${latency}`;
        return {
          text: `$(sparkle) maskfill${latency}`,
          tooltip: `maskfill: ready, ${last}${detail}`,
          isError: false,
        };
      }
    }
  }
}

// The server's `maskfill/didChangeStatus` notification (lsp_server/server.py); `state` is the
// engine's load state: unloaded | loading | ready | failed | closed.
export interface ServerStatus {
  state?: string;
  enabled?: boolean;
  error?: string | null;
}

export function phaseFromServerStatus(status: ServerStatus): { phase: Phase; detail: string } {
  switch (status.state) {
    case "ready":
      return { phase: "ready", detail: "" };
    case "failed":
      return { phase: "error", detail: status.error || "the model failed to load" };
    case "closed":
      return { phase: "stopped", detail: "" };
    default:
      return { phase: "loading", detail: "" };
  }
}

// One line for the tooltip from the `maskfill.status` command's reply.
export function describeModel(reply: unknown): string {
  if (typeof reply !== "object" || reply === null) return "";
  const r = reply as Record<string, unknown>;
  if (typeof r.model !== "string") return "";
  const quant = r.quant && r.quant !== "none" ? `, ${String(r.quant)}` : "";
  return `${r.model} on ${String(r.device)}${quant}`;
}
