import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { isExecutableFile, resolveServer, type ServerLookup } from "../src/serverPath";

function lookup(overrides: Partial<ServerLookup>, executables: string[]): ServerLookup {
  const set = new Set(executables);
  return {
    configuredPath: "",
    workspaceFolders: [],
    pathEnv: "",
    platform: "linux",
    isExecutable: (f) => set.has(f),
    ...overrides,
  };
}

describe("resolveServer", () => {
  it("prefers the configured path over the venv and PATH", () => {
    const r = resolveServer(
      lookup({ configuredPath: "/opt/mf/bin/maskfill-lsp", workspaceFolders: ["/w"], pathEnv: "/usr/bin" }, [
        "/opt/mf/bin/maskfill-lsp",
        "/w/.venv/bin/maskfill-lsp",
        "/usr/bin/maskfill-lsp",
      ]),
    );
    expect(r).toEqual({
      ok: true,
      server: { command: "/opt/mf/bin/maskfill-lsp", args: ["--stdio"], source: "setting" },
    });
  });

  it("reports a configured path that is not executable instead of falling back", () => {
    const r = resolveServer(
      lookup({ configuredPath: "/nope/maskfill-lsp", pathEnv: "/usr/bin" }, ["/usr/bin/maskfill-lsp"]),
    );
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.message).toContain('"/nope/maskfill-lsp", which is not an executable file');
  });

  it("looks a bare configured name up on PATH", () => {
    const r = resolveServer(lookup({ configuredPath: "my-lsp", pathEnv: "/a:/b" }, ["/b/my-lsp"]));
    expect(r.ok && r.server.command).toBe("/b/my-lsp");
  });

  it("finds the workspace venv before PATH", () => {
    const r = resolveServer(
      lookup({ workspaceFolders: ["/w1", "/w2"], pathEnv: "/usr/bin" }, [
        "/w2/.venv/bin/maskfill-lsp",
        "/usr/bin/maskfill-lsp",
      ]),
    );
    expect(r.ok && r.server).toEqual({
      command: "/w2/.venv/bin/maskfill-lsp",
      args: ["--stdio"],
      source: "venv",
    });
  });

  it("uses Scripts\\maskfill-lsp.exe on Windows", () => {
    const r = resolveServer(
      lookup({ platform: "win32", workspaceFolders: ["C:\\w"] }, ["C:\\w\\.venv\\Scripts\\maskfill-lsp.exe"]),
    );
    expect(r.ok && r.server.command).toBe("C:\\w\\.venv\\Scripts\\maskfill-lsp.exe");
  });

  it("falls back to PATH in order", () => {
    const r = resolveServer(lookup({ pathEnv: "/a::/b:/c" }, ["/b/maskfill-lsp", "/c/maskfill-lsp"]));
    expect(r.ok && r.server).toEqual({ command: "/b/maskfill-lsp", args: ["--stdio"], source: "PATH" });
  });

  it("says plainly where it looked when nothing is found", () => {
    const r = resolveServer(lookup({ workspaceFolders: ["/w"], pathEnv: "/usr/bin" }, []));
    expect(r.ok).toBe(false);
    if (!r.ok) {
      expect(r.message).toContain("Cannot find maskfill-lsp");
      expect(r.message).toContain("/w/.venv");
      expect(r.message).toContain("maskfill.serverPath");
    }
  });
});

describe("isExecutableFile", () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "maskfill-vscode-"));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it("accepts an executable file and rejects plain files, folders and missing paths", () => {
    const exe = path.join(dir, "maskfill-lsp");
    const plain = path.join(dir, "notes.txt");
    fs.writeFileSync(exe, "#!/bin/sh\n", { mode: 0o755 });
    fs.writeFileSync(plain, "x", { mode: 0o644 });
    expect(isExecutableFile(exe)).toBe(true);
    expect(isExecutableFile(plain)).toBe(false);
    expect(isExecutableFile(dir)).toBe(false);
    expect(isExecutableFile(path.join(dir, "missing"))).toBe(false);
  });
});

describe("in a remote window", () => {
  it("says that this machine's path goes in Remote settings", () => {
    const note =
      "This is a remote window (ssh-remote): set this machine's maskfill.serverPath in Remote settings," +
      " which take precedence over User settings.";
    const missing = resolveServer(lookup({ workspaceFolders: ["/w"], remote: "ssh-remote" }, []));
    expect(missing.ok).toBe(false);
    if (!missing.ok) {
      expect(missing.message).toContain("Cannot find maskfill-lsp (looked in /w/.venv, PATH)");
      expect(missing.message).toContain(note);
    }
    // A path from User settings that names another machine's file.
    const elsewhere = resolveServer(
      lookup({ configuredPath: "/Users/me/bin/maskfill-lsp", remote: "ssh-remote" }, []),
    );
    if (!elsewhere.ok) expect(elsewhere.message).toContain(note);
    const local = resolveServer(lookup({ workspaceFolders: ["/w"] }, []));
    if (!local.ok) expect(local.message).not.toContain("remote window");
  });
});
