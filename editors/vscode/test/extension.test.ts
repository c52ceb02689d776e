// activate() against a mocked `vscode` and a mocked language client: which server it launches,
// with which options, and what the commands, settings changes and status bar do.
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

const h = vi.hoisted(() => {
  const state = {
    config: {} as Record<string, unknown>,
    workspaceConfig: {} as Record<string, unknown>, // the workspace layer of `config`, for inspect()
    editorConfig: {} as Record<string, unknown>,
    commands: new Map<string, (...args: unknown[]) => unknown>(),
    configListeners: [] as ((e: { affectsConfiguration: (s: string) => boolean }) => unknown)[],
    errors: [] as string[],
    warnings: [] as string[],
    infos: [] as string[],
    offered: [] as string[][], // the buttons of each message, in order
    choice: undefined as string | undefined, // the button the "user" clicks
    executed: [] as unknown[][], // commands run through vscode.commands.executeCommand
    updates: [] as [string, unknown, unknown][],
    clients: [] as FakeClient[],
    statusReply: { loadState: "ready", model: "/m/tiny", device: "cpu", quant: "none" } as unknown,
    startError: undefined as Error | undefined,
    remoteName: undefined as string | undefined,
    extensionFiles: ["package.json", "readme.md", "out"], // what vsce puts in a .vsix
    item: {
      text: "",
      tooltip: "",
      command: undefined as unknown,
      backgroundColor: undefined as unknown,
      show() {},
      dispose() {},
    },
    log: { info: vi.fn(), error: vi.fn(), show: vi.fn(), dispose() {} },
  };
  // Like vscode-languageclient's client: start() spawns the server through the server options
  // function (a real process), then fails with `startError` when set.
  class FakeClient {
    state = 2; // State.Running
    requests: unknown[] = [];
    notifications: unknown[] = [];
    shownErrors: string[] = []; // error() calls that would show a notification
    stopped = false;
    spawned: string[] = []; // the server process's argv
    handlers = new Map<string, (params: unknown) => void>();
    constructor(
      public id: string,
      public name: string,
      public serverOptions: () => Promise<{ spawnargs: string[] }>,
      public clientOptions: {
        initializationOptions: unknown;
        middleware: unknown;
        errorHandler: { closed: () => Promise<{ action: number; handled?: boolean }> };
        initializationFailedHandler: (e: unknown) => boolean;
      },
    ) {
      state.clients.push(this);
    }
    async start() {
      this.spawned = (await this.serverOptions()).spawnargs;
      if (state.startError) {
        this.state = 4; // State.StartFailed
        this.error("maskfill client: couldn't create connection to server.", state.startError, "force");
        throw state.startError;
      }
    }
    error(message: string, _data?: unknown, showNotification: boolean | "force" = true) {
      if (showNotification) this.shownErrors.push(message);
    }
    needsStop() {
      return !this.stopped;
    }
    async stop() {
      this.stopped = true;
      this.state = 1;
    }
    onNotification(method: string, handler: (params: unknown) => void) {
      this.handlers.set(method, handler);
      return { dispose() {} };
    }
    notifyFromServer(method: string, params: unknown) {
      this.handlers.get(method)!(params);
    }
    onDidChangeState() {
      return { dispose() {} };
    }
    async sendRequest(type: string, params: unknown) {
      this.requests.push([type, params]);
      return state.statusReply;
    }
    async sendNotification(type: string, params: unknown) {
      this.notifications.push([type, params]);
    }
  }
  return { state, FakeClient };
});

vi.mock("vscode", () => ({
  StatusBarAlignment: { Left: 1, Right: 2 },
  UIKind: { Desktop: 1, Web: 2 },
  env: {
    get remoteName() {
      return h.state.remoteName;
    },
    uiKind: 1,
  },
  ConfigurationTarget: { Global: 1, Workspace: 2, WorkspaceFolder: 3 },
  ThemeColor: class {
    constructor(public id: string) {}
  },
  Uri: {
    joinPath: (base: { path: string }, ...parts: string[]) => ({ path: [base.path, ...parts].join("/") }),
  },
  window: {
    createOutputChannel: () => h.state.log,
    createStatusBarItem: () => h.state.item,
    showErrorMessage: async (message: string, ...items: string[]) => {
      h.state.errors.push(message);
      h.state.offered.push(items);
      return h.state.choice;
    },
    showWarningMessage: async (message: string, ...items: string[]) => {
      h.state.warnings.push(message);
      h.state.offered.push(items);
      return h.state.choice;
    },
    showInformationMessage: async (message: string, ...items: string[]) => {
      h.state.infos.push(message);
      h.state.offered.push(items);
      return h.state.choice;
    },
  },
  commands: {
    registerCommand: (name: string, fn: (...args: unknown[]) => unknown) => {
      h.state.commands.set(name, fn);
      return { dispose() {} };
    },
    executeCommand: async (...args: unknown[]) => {
      h.state.executed.push(args);
    },
  },
  workspace: {
    workspaceFolders: undefined,
    fs: {
      readDirectory: async () => h.state.extensionFiles.map((name) => [name, 1]),
    },
    getConfiguration: (section: string) => ({
      get: (key: string) => (section === "editor" ? h.state.editorConfig[key] : h.state.config[key]),
      inspect: (key: string) => ({
        key: `${section}.${key}`,
        defaultValue: key === "enabled" ? true : undefined,
        globalValue: h.state.config[key],
        workspaceValue: h.state.workspaceConfig[key],
      }),
      update: async (key: string, value: unknown, target: unknown) => {
        h.state.updates.push([key, value, target]);
      },
    }),
    onDidChangeConfiguration: (fn: (e: { affectsConfiguration: (s: string) => boolean }) => unknown) => {
      h.state.configListeners.push(fn);
      return { dispose() {} };
    },
  },
}));

vi.mock("vscode-languageclient/node", () => ({
  LanguageClient: h.FakeClient,
  State: { Stopped: 1, Running: 2, Starting: 3, StartFailed: 4 },
  CloseAction: { DoNotRestart: 1, Restart: 2 },
  ErrorAction: { Continue: 1, Shutdown: 2 },
  DidChangeConfigurationNotification: { type: "workspace/didChangeConfiguration" },
  ExecuteCommandRequest: { type: "workspace/executeCommand" },
}));

import { activate, deactivate } from "../src/extension";

const STATUS = "maskfill/didChangeStatus";
// A console script whose environment lacks torch, as Python reports it.
const BROKEN = `#!/bin/sh
echo 'Traceback (most recent call last):' >&2
echo '  File "/x/maskfill-lsp", line 2, in <module>' >&2
echo '    import torch' >&2
echo "ModuleNotFoundError: No module named 'torch'" >&2
exit 1
`;
let dir: string;
let server: string;
const writeServer = (body: string) => fs.writeFileSync(server, body, { mode: 0o755 });
const EXTENSION_URI = { path: "/ext/maskfill" };
const context = () => ({ subscriptions: [] as unknown[], extensionUri: EXTENSION_URI }) as never;
const manifest = () => JSON.parse(fs.readFileSync(path.join(__dirname, "..", "package.json"), "utf8"));
const changeConfig = async () => {
  for (const fn of h.state.configListeners) await fn({ affectsConfiguration: (s) => s === "maskfill" });
};

beforeEach(() => {
  vi.clearAllMocks(); // the log's spies are shared by every test
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "maskfill-ext-"));
  server = path.join(dir, "maskfill-lsp");
  fs.writeFileSync(server, "#!/bin/sh\n", { mode: 0o755 });
  Object.assign(h.state, {
    editorConfig: {},
    workspaceConfig: {},
    config: { serverPath: server, model: "/models/tiny", device: "cuda", quant: "int8", enabled: true },
    errors: [],
    warnings: [],
    infos: [],
    offered: [],
    choice: undefined,
    executed: [],
    updates: [],
    clients: [],
    configListeners: [],
    statusReply: { loadState: "ready", model: "/m/tiny", device: "cpu", quant: "none" },
    startError: undefined,
    remoteName: undefined,
    extensionFiles: ["package.json", "readme.md", "out"],
  });
  h.state.commands.clear();
});

afterEach(async () => {
  await deactivate();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe("activate", () => {
  it("launches the configured server over stdio with the settings as initializationOptions", async () => {
    await activate(context());
    expect(h.state.clients).toHaveLength(1);
    const client = h.state.clients[0];
    expect(client.spawned).toEqual([server, "--stdio"]);
    expect(client.clientOptions.initializationOptions).toMatchObject({
      model: "/models/tiny",
      device: "cuda",
      quant: "int8",
      enabled: true,
    });
    expect(client.clientOptions.initializationOptions).not.toHaveProperty("serverPath");
  });

  it("follows the server's status notifications: loading, then ready with the model", async () => {
    await activate(context());
    const client = h.state.clients[0];
    expect(h.state.item.text).toBe("$(loading~spin) maskfill");
    client.notifyFromServer(STATUS, { state: "loading", enabled: true, error: null });
    expect(h.state.item.tooltip).toContain("loading the model");
    client.notifyFromServer(STATUS, { state: "ready", enabled: true, error: null });
    expect(h.state.item.text).toBe("$(sparkle) maskfill");
    await vi.waitFor(() => expect(h.state.item.tooltip).toContain("/m/tiny on cpu"));
    expect(client.requests).toContainEqual([
      "workspace/executeCommand",
      { command: "maskfill.status", arguments: [] },
    ]);
    client.notifyFromServer(STATUS, { state: "ready", enabled: false, error: null });
    expect(h.state.item.text).toBe("$(circle-slash) maskfill off");
  });

  it("registers restart, toggle, show log and server status commands", async () => {
    await activate(context());
    expect([...h.state.commands.keys()].sort()).toEqual([
      "maskfill.checkInstall",
      "maskfill.restartServer",
      "maskfill.showLog",
      "maskfill.showServerStatus",
      "maskfill.toggleCompletions",
      "maskfill.triggerSuggestion",
    ]);
    h.state.commands.get("maskfill.showLog")!();
    expect(h.state.log.show).toHaveBeenCalled();
    // The command palette lists exactly these (package.json contributes.commands).
    const contributed = manifest().contributes.commands.map((c: { command: string }) => c.command);
    expect(contributed.sort()).toEqual([...h.state.commands.keys()].sort());
  });

  it("shows the server's status in the log", async () => {
    await activate(context());
    await h.state.commands.get("maskfill.showServerStatus")!();
    expect(h.state.log.info).toHaveBeenCalledWith(expect.stringContaining('"loadState": "ready"'));
    expect(h.state.log.show).toHaveBeenCalled();
  });

  it("says plainly when the server cannot be found, and offers the install guide", async () => {
    h.state.config.serverPath = path.join(dir, "missing-lsp");
    h.state.choice = "Install Guide";
    await activate(context());
    expect(h.state.clients).toHaveLength(0);
    expect(h.state.errors[0]).toContain("missing-lsp");
    expect(h.state.errors[0]).toContain("not an executable file");
    expect(h.state.offered[0]).toEqual(["Install Guide", "Set Server Path", "Show Output"]);
    // The guide is the README shipped inside the extension (vsce names it readme.md), opened as a
    // rendered preview under its own name: README.md does not exist on a case-sensitive disk.
    await vi.waitFor(() =>
      expect(h.state.executed).toContainEqual(["markdown.showPreview", { path: "/ext/maskfill/readme.md" }]),
    );
    expect(h.state.item.text).toBe("$(error) maskfill");
    // The tooltip says "click for the log": the click runs the show-log command.
    expect(h.state.item.tooltip).toContain("click for the log");
    expect(h.state.item.command).toBe("maskfill.showLog");
    h.state.commands.get(h.state.item.command as string)!();
    expect(h.state.log.show).toHaveBeenCalled();
  });

  it("warns when VS Code's inline suggestions are turned off", async () => {
    h.state.editorConfig["inlineSuggest.enabled"] = false;
    await activate(context());
    expect(h.state.warnings[0]).toContain("editor.inlineSuggest.enabled is off");
    expect(h.state.clients).toHaveLength(1);
  });

  it("says how a server that fails to start ended and what it wrote to stderr, once", async () => {
    writeServer(BROKEN);
    h.state.startError = new Error("write EPIPE"); // what the client saw of it
    await activate(context());
    const reason =
      "the server exited with code 1 before it started; its stderr ended: " +
      'File "/x/maskfill-lsp", line 2, in <module> | import torch | ' +
      "ModuleNotFoundError: No module named 'torch'";
    expect(h.state.errors).toEqual([`maskfill: ${reason}`]);
    expect(h.state.offered).toEqual([["Show Output"]]);
    expect(h.state.clients[0].shownErrors).toEqual([]); // the client's own message stays in the log
    expect(h.state.item.text).toBe("$(error) maskfill");
    expect(h.state.item.tooltip).toContain("No module named 'torch'");
    expect(h.state.clients[0].clientOptions.initializationFailedHandler(new Error("x"))).toBe(false);
  });

  it("in a remote window, says that this machine's path goes in Remote settings and opens them", async () => {
    h.state.remoteName = "ssh-remote";
    h.state.config.serverPath = "";
    h.state.choice = "Set Server Path";
    await activate(context());
    expect(h.state.errors[0]).toContain("Cannot find maskfill-lsp");
    expect(h.state.errors[0]).toContain(
      "This is a remote window (ssh-remote): set this machine's maskfill.serverPath in Remote settings",
    );
    await vi.waitFor(() =>
      expect(h.state.executed).toContainEqual([
        "workbench.action.openRemoteSettings",
        { query: "maskfill.serverPath" },
      ]),
    );
  });

  it("in a local window, Set Server Path opens the user settings at the setting", async () => {
    h.state.config.serverPath = "";
    h.state.choice = "Set Server Path";
    await activate(context());
    expect(h.state.errors[0]).not.toContain("remote window");
    await vi.waitFor(() =>
      expect(h.state.executed).toContainEqual(["workbench.action.openSettings", "maskfill.serverPath"]),
    );
  });

  it("restarts a server that stopped while running, then gives up saying why", async () => {
    await activate(context());
    const client = h.state.clients[0];
    const closed = () => client.clientOptions.errorHandler.closed();
    for (let i = 0; i < 4; i++) expect(await closed()).toEqual({ action: 2, handled: true }); // Restart
    expect(await closed()).toEqual({ action: 1, handled: true }); // DoNotRestart
    expect(h.state.errors).toEqual([
      "maskfill: the server exited with code 0, after 4 restarts in 3 minutes",
    ]);
    expect(h.state.offered).toEqual([["Restart Server", "Show Output"]]);
    expect(h.state.item.text).toBe("$(error) maskfill");
  });

  it("does not restart a server whose start failed", async () => {
    await activate(context());
    const client = h.state.clients[0];
    client.state = 3; // State.Starting
    expect(await client.clientOptions.errorHandler.closed()).toEqual({ action: 1, handled: true });
    expect(h.state.errors).toEqual([]); // the failed start itself is reported by activate
  });

  it("shows a model that failed to load as an error in the status bar", async () => {
    await activate(context());
    const failed = { state: "failed", enabled: true, error: "cuda: CUDA out of memory" };
    h.state.clients[0].notifyFromServer(STATUS, failed);
    expect(h.state.item.text).toBe("$(error) maskfill");
    expect(h.state.item.tooltip).toContain("cuda: CUDA out of memory");
    expect(h.state.errors).toEqual([]); // the server's showMessage already said it
  });
});

describe("commands and settings", () => {
  it("toggle flips maskfill.enabled, and the change reaches the server and the status bar", async () => {
    await activate(context());
    h.state.clients[0].notifyFromServer(STATUS, { state: "ready", enabled: true, error: null });
    await h.state.commands.get("maskfill.toggleCompletions")!();
    expect(h.state.updates).toEqual([["enabled", false, 1]]);
    h.state.config.enabled = false;
    await changeConfig();
    const client = h.state.clients[0];
    expect(client.notifications).toHaveLength(1);
    const [type, params] = client.notifications[0] as [string, { settings: Record<string, unknown> }];
    expect(type).toBe("workspace/didChangeConfiguration");
    expect(params.settings).toMatchObject({ enabled: false, model: "/models/tiny" });
    expect(h.state.item.text).toBe("$(circle-slash) maskfill off");
  });

  it("toggle writes to the workspace when the workspace sets maskfill.enabled", async () => {
    // User: on; workspace: off (effective: off). A user-level write would change nothing.
    h.state.workspaceConfig.enabled = false;
    h.state.config.enabled = false;
    await activate(context());
    await h.state.commands.get("maskfill.toggleCompletions")!();
    expect(h.state.updates).toEqual([["enabled", true, 2]]); // ConfigurationTarget.Workspace
  });

  it("restart stops the running client and starts a new one", async () => {
    await activate(context());
    await h.state.commands.get("maskfill.restartServer")!();
    expect(h.state.clients).toHaveLength(2);
    expect(h.state.clients[0].stopped).toBe(true);
    expect(h.state.clients[1].stopped).toBe(false);
  });

  it("a new serverPath restarts the server with it", async () => {
    await activate(context());
    const other = path.join(dir, "other-lsp");
    fs.writeFileSync(other, "#!/bin/sh\n", { mode: 0o755 });
    h.state.config.serverPath = other;
    await changeConfig();
    expect(h.state.clients).toHaveLength(2);
    expect(h.state.clients[1].spawned).toEqual([other, "--stdio"]);
    expect(h.state.clients[0].notifications).toHaveLength(0);
  });

  it("starts no server while maskfill.enabled is false, and starts it when it turns true", async () => {
    h.state.config.enabled = false;
    await activate(context());
    expect(h.state.clients).toHaveLength(0);
    expect(h.state.item.text).toBe("$(circle-slash) maskfill off");
    expect(h.state.errors).toEqual([]);
    h.state.config.model = "/models/other"; // other changes while off start nothing either
    await changeConfig();
    expect(h.state.clients).toHaveLength(0);

    h.state.config.enabled = true;
    await changeConfig();
    expect(h.state.clients).toHaveLength(1);
    expect(h.state.clients[0].clientOptions.initializationOptions).toMatchObject({
      enabled: true,
      model: "/models/other",
    });
    expect(h.state.item.text).toBe("$(loading~spin) maskfill");
  });

  it("contributes Alt+\\ for the manual trigger, which asks VS Code for an Invoke request", async () => {
    const bindings = manifest().contributes.keybindings as { command: string; key: string; when: string }[];
    const trigger = bindings.find((b) => b.command === "maskfill.triggerSuggestion");
    expect(trigger).toMatchObject({ key: "alt+\\" });
    expect(trigger!.when).toContain("config.maskfill.enabled"); // when off, the key stays VS Code's
    await activate(context());
    await h.state.commands.get("maskfill.triggerSuggestion")!();
    expect(h.state.executed).toEqual([["editor.action.inlineSuggest.trigger"]]);
  });

  it("the manual trigger says why nothing can answer instead of showing nothing", async () => {
    h.state.config.enabled = false;
    h.state.choice = "Turn On";
    await activate(context());
    await h.state.commands.get("maskfill.triggerSuggestion")!();
    expect(h.state.infos).toEqual(["maskfill is turned off here."]);
    await vi.waitFor(() => expect(h.state.executed).toEqual([["maskfill.toggleCompletions"]]));

    h.state.config.enabled = true;
    writeServer(BROKEN);
    h.state.startError = new Error("write EPIPE");
    h.state.choice = undefined;
    await changeConfig();
    await h.state.commands.get("maskfill.triggerSuggestion")!();
    expect(h.state.warnings).toEqual([
      expect.stringMatching(/^maskfill: the server exited with code 1 before it started; its stderr ended: /),
    ]);
    expect(h.state.offered.at(-1)).toEqual(["Restart Server", "Show Output"]);
  });

  it("the manual trigger says so when completions were turned off in a running server", async () => {
    await activate(context());
    h.state.config.enabled = false;
    await changeConfig();
    await h.state.commands.get("maskfill.triggerSuggestion")!();
    expect(h.state.infos).toEqual(["maskfill is turned off here."]);
    expect(h.state.executed).toEqual([]); // no request that the middleware would drop
  });

  it("Check Install runs maskfill-lsp --check with the window's settings and reports it", async () => {
    fs.writeFileSync(
      server,
      "#!/bin/sh\necho \"args: $*\"\necho 'FAIL  cuda      not available'\nexit 1\n",
      { mode: 0o755 },
    );
    await activate(context());
    await h.state.commands.get("maskfill.checkInstall")!();
    expect(h.state.log.info).toHaveBeenCalledWith(
      "args: --check --model /models/tiny --device cuda --quant int8",
    );
    expect(h.state.warnings).toEqual(["maskfill: FAIL cuda not available"]);
    expect(h.state.offered.at(-1)).toEqual(["Show Output"]);
  });

  it("deactivate stops the client", async () => {
    await activate(context());
    await deactivate();
    expect(h.state.clients[0].stopped).toBe(true);
  });
});
