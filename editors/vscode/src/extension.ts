// maskfill for VS Code: launches maskfill-lsp, passes settings, shows state. The server does the
// work; inline completion itself is built into vscode-languageclient 11.
import * as vscode from "vscode";
import { DidChangeConfigurationNotification, ExecuteCommandRequest, State } from "vscode-languageclient/node";
import { MaskfillClient } from "./client";
import { checkArgs, runInstallCheck } from "./installCheck";
import { readmeName } from "./installGuide";
import { inlineMiddleware } from "./middleware";
import { EXIT_WAIT_MS, startFailure } from "./serverProcess";
import { isExecutableFile, resolveServer } from "./serverPath";
import {
  type ClientSettings,
  needsRestart,
  readSettings,
  serverSettings,
  toggledEnabled,
} from "./settings";
import { describeModel, phaseFromServerStatus, type ServerStatus, StatusTracker } from "./status";

const SECTION = "maskfill";
const STATUS_NOTIFICATION = "maskfill/didChangeStatus"; // lsp_server/server.py
const SHOW_LOG = "maskfill.showLog";
const TOGGLE = "maskfill.toggleCompletions";
const CHECK = "maskfill.checkInstall";
const TRIGGER = "maskfill.triggerSuggestion"; // package.json binds it (Alt+\\)
const INLINE_TRIGGER = "editor.action.inlineSuggest.trigger"; // VS Code's own: an Invoke request
const INLINE_OFF = "maskfill: editor.inlineSuggest.enabled is off, so no suggestion will show.";
let stopClient: (() => Promise<void>) | undefined; // awaited by deactivate()

interface Action {
  title: string;
  run: () => unknown;
}

// A message with buttons; the chosen one runs.
type Show = (message: string, ...items: string[]) => Thenable<string | undefined>;

function offer(show: Show, message: string, actions: Action[]): void {
  void show(message, ...actions.map((a) => a.title)).then((choice) =>
    actions.find((a) => a.title === choice)?.run(),
  );
}

// The remote's name in a remote window, where machine-overridable settings (maskfill.serverPath)
// come from Remote settings. A node extension in a browser window (code-server) runs remotely.
function remoteName(): string | undefined {
  return vscode.env.remoteName ?? (vscode.env.uiKind === vscode.UIKind.Web ? "browser" : undefined);
}

function currentSettings(): ClientSettings {
  const config = vscode.workspace.getConfiguration(SECTION);
  return readSettings((key) => config.get(key));
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const log = vscode.window.createOutputChannel("maskfill", { log: true });
  const item = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  item.command = SHOW_LOG; // the error tooltip says "click for the log"
  const status = new StatusTracker();
  let settings = currentSettings();
  let server: MaskfillClient | undefined;
  const remote = remoteName();
  if (remote !== undefined) log.info(`remote window (${remote}): the server runs on that machine`);

  const render = (): void => {
    const view = status.view();
    item.text = view.text;
    item.tooltip = view.tooltip;
    item.backgroundColor = view.isError ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
    item.show();
  };
  const showLog: Action = { title: "Show Output", run: () => log.show() };
  // A missing server is an install problem: point at the install steps (the README ships in the
  // .vsix) and at the setting, in the settings a remote window reads it from, not only at the log.
  const installActions: Action[] = [
    {
      title: "Install Guide",
      run: async () => {
        const files = await vscode.workspace.fs.readDirectory(context.extensionUri);
        const readme = vscode.Uri.joinPath(context.extensionUri, readmeName(files.map(([name]) => name)));
        return vscode.commands.executeCommand("markdown.showPreview", readme);
      },
    },
    {
      title: "Set Server Path",
      run: () =>
        remote === undefined
          ? vscode.commands.executeCommand("workbench.action.openSettings", "maskfill.serverPath")
          : vscode.commands.executeCommand("workbench.action.openRemoteSettings", {
              query: "maskfill.serverPath",
            }),
    },
  ];
  const fail = (message: string, notify = true, actions: Action[] = []): void => {
    status.setPhase("error", message);
    render();
    log.error(message);
    if (notify) offer(vscode.window.showErrorMessage, `maskfill: ${message}`, [...actions, showLog]);
  };
  const queryServerStatus = async (): Promise<unknown> =>
    server?.client.sendRequest(ExecuteCommandRequest.type, { command: "maskfill.status", arguments: [] });
  const onServerStatus = (params: ServerStatus): void => {
    const { phase, detail } = phaseFromServerStatus(params);
    if (typeof params.enabled === "boolean") status.enabled = params.enabled;
    status.setPhase(phase, detail); // a failed load also comes as the server's own showMessage
    render();
    if (phase !== "ready") return;
    const named = (reply: unknown): void => {
      status.detail = describeModel(reply);
      render();
    };
    queryServerStatus().then(named, () => undefined); // without it the tooltip names no model
  };

  const findServer = () =>
    resolveServer({
      configuredPath: settings.serverPath,
      workspaceFolders: (vscode.workspace.workspaceFolders ?? []).map((f) => f.uri.fsPath),
      pathEnv: process.env.PATH,
      platform: process.platform,
      isExecutable: isExecutableFile,
      remote,
    });

  const stop = async (): Promise<void> => {
    const running = server;
    server = undefined;
    await running?.stop();
  };
  const restart = async (): Promise<void> => {
    await stop();
    await start();
  };

  const start = async (): Promise<void> => {
    status.enabled = settings.enabled;
    if (!settings.enabled) {
      // Turned off for this window: no process, no model in memory until it is turned on.
      status.setPhase("off");
      render();
      log.info("maskfill.enabled is false: the server starts when it is turned on");
      return;
    }
    const found = findServer();
    if (!found.ok) return fail(found.message, true, installActions);
    log.info(
      `starting ${found.server.command} ${found.server.args.join(" ")} (found via ${found.server.source})`,
    );
    status.setPhase("starting");
    render();
    const launch = {
      ...found.server,
      cwd: vscode.workspace.workspaceFolders?.[0]?.uri.fsPath, // as the client's own default
    };
    const options = {
      documentSelector: [{ scheme: "file" }, { scheme: "untitled" }], // the server filters languages
      initializationOptions: serverSettings(settings),
      outputChannel: log,
      middleware: inlineMiddleware(
        () => settings,
        (ms) => {
          status.recordLatency(ms);
          render();
        },
      ),
    };
    const restartServer: Action = { title: "Restart Server", run: restart };
    const started = new MaskfillClient(launch, options, (reason) => fail(reason, true, [restartServer]));
    server = started;
    const client = started.client;
    client.onNotification(STATUS_NOTIFICATION, onServerStatus);
    client.onDidChangeState(({ newState }) => {
      if (newState === State.Stopped && status.phase !== "error") status.setPhase("stopped");
      render();
    });
    try {
      await client.start();
    } catch (err) {
      // The client only knows its end of the pipe ("write EPIPE"): say how the process ended
      // and what it wrote to stderr.
      const reason = err instanceof Error ? err.message : String(err);
      const exit = await started.process?.waitForExit(EXIT_WAIT_MS);
      const stderr = started.process?.stderrTail() ?? [];
      await started.stop();
      if (server === started) server = undefined; // a settings change tries again
      return fail(startFailure(reason, exit, stderr));
    }
    if (status.phase === "starting") status.setPhase("loading"); // until the server says ready
    render();
  };

  context.subscriptions.push(
    log,
    item,
    vscode.commands.registerCommand("maskfill.restartServer", restart),
    vscode.commands.registerCommand(SHOW_LOG, () => log.show()),
    vscode.commands.registerCommand(TOGGLE, () => {
      // Flip the value where the effective one comes from: a workspace value would hide a new
      // user-level one.
      const config = vscode.workspace.getConfiguration(SECTION);
      const { scope, value } = toggledEnabled(config.inspect<boolean>("enabled"));
      const target =
        scope === "workspace" ? vscode.ConfigurationTarget.Workspace : vscode.ConfigurationTarget.Global;
      return config.update("enabled", value, target);
    }),
    vscode.commands.registerCommand(TRIGGER, async (): Promise<void> => {
      // Several candidates now (the server answers an Invoke request with numCandidates); when
      // nothing can answer, say why instead of showing nothing.
      if (!settings.enabled) {
        // Also when the server runs: turned off, its middleware would drop the request.
        const turnOn = { title: "Turn On", run: () => vscode.commands.executeCommand(TOGGLE) };
        offer(vscode.window.showInformationMessage, "maskfill is turned off here.", [turnOn]);
      } else if (server?.client.state === State.Running) {
        await vscode.commands.executeCommand(INLINE_TRIGGER);
      } else {
        const restartServer = { title: "Restart Server", run: restart };
        const why = status.phase === "error" ? status.detail : "the server is not running";
        offer(vscode.window.showWarningMessage, `maskfill: ${why}`, [restartServer, showLog]);
      }
    }),
    vscode.commands.registerCommand(CHECK, async (): Promise<void> => {
      // The install check (torch build, CUDA, model, memory fit) with this window's settings.
      const found = findServer();
      if (!found.ok) return fail(found.message, true, installActions);
      const args = checkArgs(settings);
      log.info(`running ${found.server.command} ${args.join(" ")}`);
      const report = await runInstallCheck(found.server.command, args);
      for (const line of report.lines) log.info(line);
      const show = report.passed ? vscode.window.showInformationMessage : vscode.window.showWarningMessage;
      offer(show, `maskfill: ${report.headline}`, [showLog]);
    }),
    vscode.commands.registerCommand("maskfill.showServerStatus", async () => {
      const reply = server
        ? await queryServerStatus().catch((err: unknown) => `unavailable: ${String(err)}`)
        : "the server is not running";
      log.info(`server status: ${JSON.stringify(reply, null, 2)}`);
      log.show();
    }),
    vscode.workspace.onDidChangeConfiguration(async (event) => {
      if (!event.affectsConfiguration(SECTION)) return;
      const before = settings;
      settings = currentSettings();
      status.enabled = settings.enabled;
      render();
      const stopped = server === undefined || [State.Stopped, State.StartFailed].includes(server.client.state);
      if (needsRestart(before, settings) || stopped) return restart();
      // A new model, device or quant makes the server reload; its status notifications follow.
      await server?.client.sendNotification(DidChangeConfigurationNotification.type, {
        settings: serverSettings(settings),
      });
    }),
  );
  stopClient = stop;
  if (vscode.workspace.getConfiguration("editor").get("inlineSuggest.enabled") === false) {
    void vscode.window.showWarningMessage(INLINE_OFF);
  }
  await start();
}

export async function deactivate(): Promise<void> {
  await stopClient?.();
}
