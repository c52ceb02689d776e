// The server process as the extension spawns it: real processes, their stderr and exit.
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { crashFailure, RestartBudget, ServerProcess, startFailure } from "../src/serverProcess";

let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "maskfill-proc-"));
});
afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

function script(body: string): string {
  const file = path.join(dir, "maskfill-lsp");
  fs.writeFileSync(file, `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  return file;
}

describe("ServerProcess", () => {
  it("keeps the exit code and the last lines of stderr", async () => {
    const lines = Array.from({ length: 60 }, (_, i) => `echo "line ${i}" >&2`).join("\n");
    const proc = await ServerProcess.start(script(`${lines}\nprintf 'no newline at the end' >&2\nexit 3`), []);
    expect(await proc.waitForExit(10_000)).toEqual({ code: 3, signal: null });
    expect(proc.stderrTail()).toEqual(["line 58", "line 59", "no newline at the end"]);
    expect(proc.stderrTail(5)).toEqual(["line 56", "line 57", "line 58", "line 59", "no newline at the end"]);
  });

  it("passes its arguments and working folder", async () => {
    const proc = await ServerProcess.start(script('echo "$* in $(pwd)" >&2'), ["--stdio"], dir);
    await proc.waitForExit(10_000);
    expect(proc.stderrTail()).toEqual([`--stdio in ${fs.realpathSync(dir)}`]);
  });

  it("rejects when the file cannot be run", async () => {
    await expect(ServerProcess.start(path.join(dir, "missing"), [])).rejects.toThrow(/ENOENT/);
  });

  it("ends a process that outlives the client's exit notification", async () => {
    const proc = await ServerProcess.start(script("exec sleep 60"), []);
    expect(await proc.waitForExit(100)).toBeUndefined();
    await proc.end();
    expect(proc.exit).toEqual({ code: null, signal: "SIGTERM" });
  });
});

describe("messages", () => {
  it("say how the process ended, with its stderr; the client's reason only when it did not end", () => {
    expect(startFailure("write EPIPE", { code: 1, signal: null }, ["a", "b"])).toBe(
      "the server exited with code 1 before it started; its stderr ended: a | b",
    );
    expect(startFailure("write EPIPE", { code: null, signal: "SIGKILL" }, [])).toBe(
      "the server was killed by SIGKILL before it started",
    );
    expect(startFailure("spawn EACCES", undefined, [])).toBe("the server did not start: spawn EACCES");
    expect(crashFailure({ code: 139, signal: null }, 4, ["Segmentation fault"])).toBe(
      "the server exited with code 139, after 4 restarts in 3 minutes; its stderr ended: Segmentation fault",
    );
  });
});

describe("RestartBudget", () => {
  it("allows four restarts in three minutes", () => {
    let now = 0;
    const budget = new RestartBudget(() => now);
    for (let i = 0; i < 4; i++) expect(budget.take()).toBe(true);
    expect(budget.take()).toBe(false);
    now = 3 * 60_000; // the first ones fall out of the window
    expect(budget.take()).toBe(true);
  });
});
