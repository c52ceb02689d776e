// Finds the maskfill-lsp executable: the user's setting, then the workspace's virtual
// environment, then PATH. vscode-free so it is unit-tested without an editor.
import * as fs from "node:fs";
import * as path from "node:path";

export const SERVER_SCRIPT = "maskfill-lsp";
export const SERVER_ARGS = ["--stdio"];

export interface ServerLookup {
  configuredPath: string; // maskfill.serverPath; "" when unset
  workspaceFolders: string[]; // file-system paths of the open folders
  pathEnv: string | undefined; // process.env.PATH
  platform: NodeJS.Platform;
  isExecutable: (file: string) => boolean;
  remote?: string; // the remote's name in a remote window (code-server, SSH, WSL, container)
}

export type ServerSource = "setting" | "venv" | "PATH";
export interface ServerCommand {
  command: string;
  args: string[];
  source: ServerSource;
}
export type Resolution = { ok: true; server: ServerCommand } | { ok: false; message: string };

function pathsFor(platform: NodeJS.Platform): path.PlatformPath {
  return platform === "win32" ? path.win32 : path.posix;
}

// Windows console scripts are maskfill-lsp.exe; a bare name must also match it there.
function executableNames(platform: NodeJS.Platform, name: string): string[] {
  return platform === "win32" ? [`${name}.exe`, `${name}.cmd`, name] : [name];
}

function searchPath(lookup: ServerLookup, name: string): string | undefined {
  const p = pathsFor(lookup.platform);
  const dirs = (lookup.pathEnv ?? "").split(p.delimiter).filter((d) => d.length > 0);
  for (const dir of dirs) {
    for (const file of executableNames(lookup.platform, name)) {
      const candidate = p.join(dir, file);
      if (lookup.isExecutable(candidate)) return candidate;
    }
  }
  return undefined;
}

function venvCandidates(lookup: ServerLookup): string[] {
  const p = pathsFor(lookup.platform);
  const binDir = lookup.platform === "win32" ? "Scripts" : "bin";
  const names = executableNames(lookup.platform, SERVER_SCRIPT);
  return lookup.workspaceFolders.flatMap((folder) =>
    [".venv", "venv"].flatMap((venv) => names.map((n) => p.join(folder, venv, binDir, n))),
  );
}

// In a remote window (code-server, SSH, WSL, a container) the server runs on the remote machine:
// a path from User settings may name a file of another machine. Remote settings take precedence
// there, so that is where this machine's path goes.
function remoteNote(lookup: ServerLookup): string {
  if (lookup.remote === undefined) return "";
  return (
    ` This is a remote window (${lookup.remote}): set this machine's maskfill.serverPath in Remote settings,` +
    ` which take precedence over User settings.`
  );
}

export function resolveServer(lookup: ServerLookup): Resolution {
  const p = pathsFor(lookup.platform);
  const configured = lookup.configuredPath.trim();
  if (configured !== "") {
    // A bare command name ("maskfill-lsp") is looked up on PATH; a path must exist as given.
    const isBareName = !configured.includes("/") && !configured.includes("\\");
    const found = isBareName ? searchPath(lookup, configured) : configured;
    if (found !== undefined && lookup.isExecutable(found)) {
      return { ok: true, server: { command: found, args: SERVER_ARGS, source: "setting" } };
    }
    // Say so rather than silently running a different server than the one configured.
    return {
      ok: false,
      message: `maskfill.serverPath is "${configured}", which is not an executable file${
        isBareName ? " on PATH" : ""
      }.${remoteNote(lookup)}`,
    };
  }
  const inVenv = venvCandidates(lookup).find((c) => lookup.isExecutable(c));
  if (inVenv !== undefined) {
    return { ok: true, server: { command: inVenv, args: SERVER_ARGS, source: "venv" } };
  }
  const onPath = searchPath(lookup, SERVER_SCRIPT);
  if (onPath !== undefined) {
    return { ok: true, server: { command: onPath, args: SERVER_ARGS, source: "PATH" } };
  }
  const looked = lookup.workspaceFolders.map((f) => p.join(f, ".venv")).concat(["PATH"]);
  return {
    ok: false,
    message:
      `Cannot find ${SERVER_SCRIPT} (looked in ${looked.join(", ")}). ` +
      `Install maskfill into that environment (pip install <maskfill checkout>) or set maskfill.serverPath.` +
      remoteNote(lookup),
  };
}

export function isExecutableFile(file: string): boolean {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}
