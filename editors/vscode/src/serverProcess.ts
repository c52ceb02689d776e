// The server process, spawned here rather than inside the language client so that a failure can
// say why: the exit code and the last lines the server wrote to stderr (a Python traceback, say),
// not the client's "write EPIPE". vscode-free.
import { type ChildProcess, spawn } from "node:child_process";

export const STDERR_TAIL_LINES = 3;
const KEPT_LINES = 50; // of stderr, for the tail
const LINE_CHARS = 300; // one line of the tail, at most
export const EXIT_WAIT_MS = 3000; // for the exit after the connection closed
const TERM_WAIT_MS = 2000; // after the LSP exit notification, then after SIGTERM

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export class ServerProcess {
  private lines: string[] = [];
  private partial = "";
  private exitInfo: Exit | undefined;
  private readonly exited: Promise<Exit>;

  private constructor(readonly child: ChildProcess) {
    child.stderr?.setEncoding("utf8");
    child.stderr?.on("data", (chunk: string) => this.collect(chunk));
    this.exited = new Promise((resolve) => {
      // "close", not "exit": by then stderr has been read to its end.
      child.once("close", (code, signal) => {
        this.exitInfo = { code, signal };
        resolve(this.exitInfo);
      });
    });
  }

  // Resolves once the process runs; rejects when it cannot (ENOENT, EACCES).
  static start(command: string, args: string[], cwd?: string): Promise<ServerProcess> {
    const child = spawn(command, args, { cwd, stdio: "pipe", windowsHide: true });
    const server = new ServerProcess(child);
    return new Promise((resolve, reject) => {
      child.once("spawn", () => resolve(server));
      child.once("error", reject);
    });
  }

  private collect(chunk: string): void {
    const parts = (this.partial + chunk).split(/\r?\n/);
    this.partial = parts.pop() ?? "";
    this.lines.push(...parts.filter((l) => l.trim() !== ""));
    if (this.lines.length > KEPT_LINES) this.lines.splice(0, this.lines.length - KEPT_LINES);
  }

  // The last non-empty lines of stderr, trimmed, each cut to a readable length.
  stderrTail(count = STDERR_TAIL_LINES): string[] {
    const lines = this.partial.trim() ? [...this.lines, this.partial] : this.lines;
    return lines.slice(-count).map((l) => {
      const line = l.trim();
      return line.length > LINE_CHARS ? `${line.slice(0, LINE_CHARS)}…` : line;
    });
  }

  get exit(): Exit | undefined {
    return this.exitInfo;
  }

  // The exit, or undefined when the process still runs after `ms`.
  async waitForExit(ms: number): Promise<Exit | undefined> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), ms);
    });
    try {
      return await Promise.race([this.exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  // After the client's shutdown/exit (or a failed start): make sure the process is gone.
  async end(): Promise<void> {
    if (this.exitInfo || (await this.waitForExit(TERM_WAIT_MS))) return;
    this.child.kill("SIGTERM");
    if (await this.waitForExit(TERM_WAIT_MS)) return;
    this.child.kill("SIGKILL");
  }
}

function howItEnded(exit: Exit): string {
  return exit.signal ? `was killed by ${exit.signal}` : `exited with code ${exit.code}`;
}

function withStderr(message: string, stderr: string[]): string {
  return stderr.length > 0 ? `${message}; its stderr ended: ${stderr.join(" | ")}` : message;
}

// One line for a server that did not get through `initialize`: how it ended and what it said.
// `reason` (the client's error) is used only when the process itself did not end.
export function startFailure(reason: string, exit: Exit | undefined, stderr: string[]): string {
  const what = exit ? `the server ${howItEnded(exit)} before it started` : `the server did not start: ${reason}`;
  return withStderr(what, stderr);
}

// One line for a server that stopped while running and will not be restarted.
export function crashFailure(exit: Exit | undefined, restarts: number, stderr: string[]): string {
  const what = exit ? `the server ${howItEnded(exit)}` : "the connection to the server closed";
  return withStderr(`${what}, after ${restarts} restarts in ${RESTART_WINDOW_MS / 60_000} minutes`, stderr);
}

export const MAX_RESTARTS = 4; // as vscode-languageclient's default error handler
export const RESTART_WINDOW_MS = 3 * 60_000;

// Whether a server that stopped while running is started again: at most MAX_RESTARTS times
// within RESTART_WINDOW_MS.
export class RestartBudget {
  private times: number[] = [];

  constructor(private readonly now: () => number = Date.now) {}

  take(): boolean {
    const now = this.now();
    this.times = this.times.filter((t) => now - t < RESTART_WINDOW_MS);
    if (this.times.length >= MAX_RESTARTS) return false;
    this.times.push(now);
    return true;
  }

  get used(): number {
    return this.times.length;
  }
}
