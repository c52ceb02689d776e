// The language client with the server process in our hands: a server that fails to start or
// keeps crashing is reported once, by the extension, with its exit code and stderr, instead of
// the client's own notifications ("couldn't create connection to server", "write EPIPE").
import {
  CloseAction,
  type CloseHandlerResult,
  ErrorAction,
  type ErrorHandler,
  type ErrorHandlerResult,
  type LanguageClientOptions,
  LanguageClient,
  State,
} from "vscode-languageclient/node";
import { crashFailure, EXIT_WAIT_MS, RestartBudget, ServerProcess } from "./serverProcess";

export interface ServerLaunch {
  command: string;
  args: string[];
  cwd?: string;
}

class QuietStartClient extends LanguageClient {
  private starting = false;

  // Restarts after a crash come through here too.
  override async start(): Promise<void> {
    this.starting = true;
    try {
      await super.start();
    } finally {
      this.starting = false;
    }
  }

  // While starting, the client's own error notifications only go to the log: the extension
  // reports a failed start itself (startFailure), with what the client does not know.
  override error(message: string, data?: unknown, showNotification: boolean | "force" = true): void {
    super.error(message, data, this.starting ? false : showNotification);
  }
}

export class MaskfillClient {
  readonly client: LanguageClient;
  private current: ServerProcess | undefined;
  private readonly restarts = new RestartBudget();

  // `onGiveUp` gets the one-line reason when a server that ran stops for good.
  constructor(launch: ServerLaunch, options: LanguageClientOptions, onGiveUp: (reason: string) => void) {
    const spawnServer = async () => {
      this.current = await ServerProcess.start(launch.command, launch.args, launch.cwd);
      return this.current.child;
    };
    const errorHandler: ErrorHandler = {
      error: (_error, _message, count): ErrorHandlerResult => ({
        // as the default handler; an error while starting is reported with the failed start
        action: count !== undefined && count <= 3 ? ErrorAction.Continue : ErrorAction.Shutdown,
        handled: this.client.state !== State.Running,
      }),
      closed: async (): Promise<CloseHandlerResult> => {
        if (this.client.state !== State.Running) return { action: CloseAction.DoNotRestart, handled: true };
        const exit = await this.current?.waitForExit(EXIT_WAIT_MS);
        if (this.restarts.take()) return { action: CloseAction.Restart, handled: true };
        onGiveUp(crashFailure(exit, this.restarts.used, this.current?.stderrTail() ?? []));
        return { action: CloseAction.DoNotRestart, handled: true };
      },
    };
    this.client = new QuietStartClient("maskfill", "maskfill", spawnServer, {
      ...options,
      errorHandler,
      initializationFailedHandler: () => false, // no retry: a failed start is reported once
    });
  }

  // The process of the last start (undefined until one was spawned).
  get process(): ServerProcess | undefined {
    return this.current;
  }

  async stop(): Promise<void> {
    if (this.client.needsStop()) await this.client.stop();
    await this.current?.end();
  }
}
