// Runs in the workbench page before VS Code's own scripts (Playwright's add_init_script). It reads
// nothing VS Code does not show: it records each notification as it appears (toasts hide
// themselves, so a test that looks later would miss them) and, when armed, the time from the next
// key press to the first ghost text of the focused editor. Times are epoch milliseconds.
(() => {
  const GHOST = ".monaco-editor.focused .ghost-text-decoration, .monaco-editor.focused .ghost-text";
  const now = () => performance.timeOrigin + performance.now();
  const probe = {
    notes: [], // {message, source, buttons, at}, each distinct message once
    armed: false,
    keyAt: null,
    ghostAt: null,
    ghostText: null,
    arm() {
      this.armed = true;
      this.keyAt = this.ghostAt = this.ghostText = null;
    },
    ghost() {
      return [...document.querySelectorAll(GHOST)].map((e) => e.textContent).join("");
    },
  };
  window.__maskfillProbe = probe;

  const textOf = (root, selector) => root.querySelector(selector)?.textContent?.trim() ?? "";
  function recordNotes() {
    for (const item of document.querySelectorAll(".notification-list-item")) {
      const message = textOf(item, ".notification-list-item-message");
      if (!message) continue;
      const buttons = [...item.querySelectorAll(".notification-list-item-buttons-container .monaco-button")]
        .map((b) => b.textContent.trim())
        .filter((t) => t);
      const seen = probe.notes.find((n) => n.message === message);
      if (seen) {
        if (buttons.length > seen.buttons.length) seen.buttons = buttons; // rendered after the text
        continue;
      }
      probe.notes.push({ message, source: textOf(item, ".notification-list-item-source"), buttons, at: now() });
    }
  }
  function recordGhost() {
    if (probe.keyAt === null || probe.ghostAt !== null) return;
    const text = probe.ghost();
    if (text.length > 0) {
      probe.ghostAt = now();
      probe.ghostText = text;
    }
  }
  window.addEventListener(
    "keydown",
    () => {
      if (probe.armed) {
        probe.armed = false;
        probe.keyAt = now();
      }
    },
    true,
  );
  const start = () =>
    new MutationObserver(() => {
      recordNotes();
      recordGhost();
    }).observe(document.documentElement, { childList: true, subtree: true, characterData: true });
  if (document.documentElement) start();
  else document.addEventListener("DOMContentLoaded", start);
})();
