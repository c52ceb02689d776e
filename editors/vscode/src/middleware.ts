// The one place the client shapes inline requests: it drops them when completions are off or
// in manual mode, and times the ones that return a suggestion. Only types come from vscode.
import type { Middleware } from "vscode-languageclient/node";
import { allowsInlineRequest, type ClientSettings } from "./settings";

export function inlineMiddleware(
  settings: () => ClientSettings,
  onLatency: (ms: number) => void,
  now: () => number = () => performance.now(),
): Middleware {
  return {
    provideInlineCompletionItems: async (document, position, context, token, next) => {
      if (!allowsInlineRequest(settings(), context.triggerKind)) return null;
      const started = now();
      const result = await next(document, position, context, token);
      const items = Array.isArray(result) ? result : (result?.items ?? []);
      if (items.length > 0) onLatency(now() - started);
      return result;
    },
  };
}
