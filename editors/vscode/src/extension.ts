// maskfill for VS Code: launches maskfill-lsp, passes settings, shows state. The server does the
// work; inline completion itself is built into vscode-languageclient 11.
import * as vscode from "vscode";
import {
  DidChangeConfigurationNotification,
  ExecuteCommandRequest,
  LanguageClient,
  State,
} from "vscode-languageclient/node";
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
const INLINE_OFF = "maskfill: editor.inlineSuggest.enabled is off, so no suggestion will show.";
let stopClient: (() => Promise<void>) | undefined; // awaited by deactivate()

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
  const fail = (message: string, notify = true): void => {
    status.setPhase("error", message);
    render();
    log.error(message);
    if (!notify) return;
    void vscode.window.showErrorMessage(`maskfill: ${message}`, "Show Log").then((choice) => {
      if (choice) log.show();
    });
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

  const start = async (): Promise<void> => {
    status.enabled = settings.enabled;
    const found = resolveServer({
      configuredPath: settings.serverPath,
      workspaceFolders: (vscode.workspace.workspaceFolders ?? []).map((f) => f.uri.fsPath),
      pathEnv: process.env.PATH,
      platform: process.platform,
      isExecutable: isExecutableFile,
    });
    if (!found.ok) return fail(found.message);
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
    vscode.commands.registerCommand("maskfill.toggleCompletions", () => {
      // Flip the value where the effective one comes from: a workspace value would hide a new
      // user-level one.
      const config = vscode.workspace.getConfiguration(SECTION);
      const { scope, value } = toggledEnabled(config.inspect<boolean>("enabled"));
      const target =
        scope === "workspace" ? vscode.ConfigurationTarget.Workspace : vscode.ConfigurationTarget.Global;
      return config.update("enabled", value, target);
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
