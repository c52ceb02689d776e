import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { checkArgs, runInstallCheck, summarize } from "../src/installCheck";
import { readSettings } from "../src/settings";

let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "maskfill-check-"));
});
afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

// An executable that prints `output` and exits with `code`, as maskfill-lsp --check would.
function script(output: string[], code: number): string {
  const file = path.join(dir, "maskfill-lsp");
  const body = output.map((l) => `echo '${l}'`).join("\n");
  fs.writeFileSync(file, `#!/bin/sh\n${body}\nexit ${code}\n`, { mode: 0o755 });
  return file;
}

describe("checkArgs", () => {
  it("passes the settings the server would get", () => {
    const settings = readSettings((k) => ({ model: "/m/dream", device: "cuda", quant: "int8" })[k]);
    expect(checkArgs(settings)).toEqual([
      "--check",
      ...["--model", "/m/dream", "--device", "cuda", "--quant", "int8"],
    ]);
  });

  it("leaves out the embedded model (no model setting)", () => {
    const settings = readSettings((k) => ({ model: "", device: "cpu", quant: "none" })[k]);
    expect(checkArgs(settings)).toEqual(["--check", "--device", "cpu", "--quant", "none"]);
  });
});

describe("summarize", () => {
  it("headlines the first FAIL line, its columns closed up", () => {
    const out = "ok    torch     2.13.0+cpu\nFAIL  cuda      not available\nFAIL  1 problem(s) above\n";
    expect(summarize(1, out)).toEqual({
      passed: false,
      lines: out.trim().split("\n"),
      headline: "FAIL cuda not available",
    });
  });

  it("headlines the verdict when all is well", () => {
    const out = "ok    torch     x\nok    ready: maskfill-lsp can serve completions on cpu\n";
    const report = summarize(0, out);
    expect(report.passed).toBe(true);
    expect(report.headline).toBe("ok ready: maskfill-lsp can serve completions on cpu");
  });
});

describe("runInstallCheck", () => {
  it("reads a passing check", async () => {
    const report = await runInstallCheck(script(["ok    ready: fine"], 0), ["--check"]);
    expect(report).toMatchObject({ passed: true, headline: "ok ready: fine" });
  });

  it("reads the check's own verdict from exit status 1", async () => {
    const report = await runInstallCheck(script(["FAIL  model     gone", "FAIL  1 problem(s)"], 1), []);
    expect(report).toMatchObject({ passed: false, headline: "FAIL model gone" });
  });

  it("says when the check could not run at all", async () => {
    const report = await runInstallCheck(path.join(dir, "missing"), ["--check"]);
    expect(report.passed).toBe(false);
    expect(report.headline).toMatch(/^the check did not run: .*ENOENT/);
  });
});
