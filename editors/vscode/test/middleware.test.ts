import type * as vscode from "vscode";
import { describe, expect, it, vi } from "vitest";
import { inlineMiddleware } from "../src/middleware";
import { readSettings } from "../src/settings";

const INVOKE = 0;
const AUTOMATIC = 1;
const item = { insertText: "return a + b" };

function call(settings: Record<string, unknown>, triggerKind: number, result: unknown) {
  const next = vi.fn(async () => result as vscode.InlineCompletionItem[] | vscode.InlineCompletionList);
  const latencies: number[] = [];
  let clock = 1000;
  const mw = inlineMiddleware(
    () => readSettings((k) => settings[k]),
    (ms) => latencies.push(ms),
    () => (clock += 40), // each reading advances 40 ms
  );
  const run = mw.provideInlineCompletionItems!(
    {} as never,
    {} as never,
    { triggerKind } as never,
    {} as never,
    next,
  );
  return { run: Promise.resolve(run), next, latencies };
}

describe("inlineMiddleware", () => {
  it("forwards requests and records the latency of non-empty answers", async () => {
    const { run, next, latencies } = call({}, AUTOMATIC, [item]);
    expect(await run).toEqual([item]);
    expect(next).toHaveBeenCalledOnce();
    expect(latencies).toEqual([40]);
  });

  it("does not record a latency for empty answers", async () => {
    const { run, latencies } = call({}, AUTOMATIC, { items: [] });
    expect(await run).toEqual({ items: [] });
    expect(latencies).toEqual([]);
  });

  it("never asks the server while completions are off", async () => {
    const { run, next } = call({ enabled: false }, INVOKE, [item]);
    expect(await run).toBeNull();
    expect(next).not.toHaveBeenCalled();
  });

  it("drops automatic requests in manual mode but serves invoked ones", async () => {
    const automatic = call({ trigger: "manual" }, AUTOMATIC, [item]);
    expect(await automatic.run).toBeNull();
    expect(automatic.next).not.toHaveBeenCalled();
    const invoked = call({ trigger: "manual" }, INVOKE, [item]);
    expect(await invoked.run).toEqual([item]);
  });
});
