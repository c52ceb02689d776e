// `maskfill-lsp --check` from the editor: the install check with the settings the server would
// get, its report for the log, and one line for a notification. vscode-free.
import { execFile } from "node:child_process";
import type { ClientSettings } from "./settings";

export const CHECK_TIMEOUT_MS = 120_000; // imports torch and reads checkpoint headers

export interface CheckReport {
  passed: boolean;
  lines: string[]; // the check's own lines, for the log
  headline: string; // the first FAIL line, else the verdict
}

// --model/--device/--quant as the server would apply them (the check mirrors its defaults).
export function checkArgs(settings: ClientSettings): string[] {
  const args = ["--check"];
  for (const key of ["model", "device", "quant"] as const) {
    const value = settings.server[key];
    if (typeof value === "string" && value !== "") args.push(`--${key}`, value);
  }
  return args;
}

// Lines are "LABEL TOPIC text" with padded columns: "FAIL  model     ..." reads "FAIL model ...".
function compact(line: string): string {
  return line.trim().replace(/\s{2,}/g, " ");
}

export function summarize(code: number | null, stdout: string, failure?: string): CheckReport {
  const lines = stdout.split(/\r?\n/).filter((l) => l.trim() !== "");
  const failed = lines.find((l) => l.startsWith("FAIL"));
  const passed = code === 0 && failure === undefined;
  const headline = failure ?? compact(failed ?? lines[lines.length - 1] ?? "the check printed nothing");
  return { passed, lines, headline };
}

export function runInstallCheck(command: string, args: string[]): Promise<CheckReport> {
  return new Promise((resolve) => {
    execFile(command, args, { timeout: CHECK_TIMEOUT_MS, windowsHide: true }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === "number" ? error.code : null) : 0;
      // Exit 1 with a report is the check's own verdict; anything else is a failure to run it.
      const ranToTheEnd = code === 0 || (code === 1 && String(stdout).trim() !== "");
      const why = String(stderr).trim() || error?.message;
      const failure = ranToTheEnd ? undefined : `the check did not run: ${why}`;
      resolve(summarize(code, String(stdout), failure));
    });
  });
}
