// maskfill for VS Code: launches maskfill-lsp, passes settings, shows state. The server does the
// work; inline completion itself is built into vscode-languageclient 11.
import * as vscode from "vscode";
import {
  DidChangeConfigurationNotification,
  ExecuteCommandRequest,
  LanguageClient,
  State,
} from "vscode-languageclient/node";
import { checkArgs, runInstallCheck } from "./installCheck";
import { inlineMiddleware } from "./middleware";
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
  let client: LanguageClient | undefined;

  const render = (): void => {
    const view = status.view();
    item.text = view.text;
    item.tooltip = view.tooltip;
    item.backgroundColor = view.isError ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
    item.show();
  };
  const showLog: Action = { title: "Show Log", run: () => log.show() };
  // A missing server is an install problem: point at the install steps (README.md ships in the
  // .vsix) and at the setting, not only at the log.
  const installActions: Action[] = [
    {
      title: "Install Guide",
      run: () =>
        vscode.commands.executeCommand(
          "markdown.showPreview",
          vscode.Uri.joinPath(context.extensionUri, "README.md"),
        ),
    },
    {
      title: "Set Server Path",
      run: () => vscode.commands.executeCommand("workbench.action.openSettings", "maskfill.serverPath"),
    },
  ];
  const fail = (message: string, notify = true, actions: Action[] = []): void => {
    status.setPhase("error", message);
    render();
    log.error(message);
    if (notify) offer(vscode.window.showErrorMessage, `maskfill: ${message}`, [...actions, showLog]);
  };
  const queryServerStatus = async (): Promise<unknown> =>
    client?.sendRequest(ExecuteCommandRequest.type, { command: "maskfill.status", arguments: [] });
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
    });

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
    client = new LanguageClient(
      "maskfill",
      "maskfill",
      { command: found.server.command, args: found.server.args },
      {
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
      },
    );
    client.onNotification(STATUS_NOTIFICATION, onServerStatus);
    client.onDidChangeState(({ newState }) => {
      if (newState === State.Stopped && status.phase !== "error") status.setPhase("stopped");
      render();
    });
    try {
      await client.start();
    } catch (err) {
      const reason = err instanceof Error ? err.message : String(err);
      return fail(`the server did not start: ${reason}`, false); // the client already said so
    }
    if (status.phase === "starting") status.setPhase("loading"); // until the server says ready
    render();
  };

  const stop = async (): Promise<void> => {
    const running = client;
    client = undefined;
    if (running?.needsStop()) await running.stop();
  };
  const restart = async (): Promise<void> => {
    await stop();
    await start();
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
      if (client?.state === State.Running) {
        await vscode.commands.executeCommand(INLINE_TRIGGER);
      } else if (!settings.enabled) {
        const turnOn = { title: "Turn On", run: () => vscode.commands.executeCommand(TOGGLE) };
        offer(vscode.window.showInformationMessage, "maskfill is turned off here.", [turnOn]);
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
      const reply = client
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
      if (needsRestart(before, settings) || client === undefined) return restart();
      // A new model, device or quant makes the server reload; its status notifications follow.
      await client.sendNotification(DidChangeConfigurationNotification.type, {
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
