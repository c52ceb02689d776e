"""The VS Code workbench in Chromium, driven as a user drives it: keys, the command palette, the
explorer, notifications and their buttons, the status bar, the ghost text in the editor.

Selectors are VS Code's own class names (1.139); each lookup says what it waited for when it
times out, with the page's notifications and status bar item.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # Playwright comes with the vscode-e2e extra, which `make test` lacks
    from playwright.sync_api import Browser, BrowserContext, Page

PROBE = (Path(__file__).parent / "page_probe.js").read_text(encoding="utf-8")
STATUS_ITEM = '[id="maskfill.maskfill"]'  # the extension's status bar item: <extension id>.<n>
CURSOR_ITEM = '[id="status.editor.selection"]'  # "Ln 2, Col 15"
QUICK_INPUT = ".quick-input-widget"
LOAD_TIMEOUT_S = 90.0
T = TypeVar("T")


class WorkbenchTimeout(AssertionError):
    pass


@dataclass(frozen=True)
class Note:
    message: str
    source: str
    buttons: list[str]
    at: float  # epoch ms


def wait_for(check: Callable[[], T], timeout: float, what: str, details: Callable[[], str]) -> T:
    """Poll `check` until it returns something truthy; fail saying `what` and `details()`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WorkbenchTimeout(
                f"timed out after {timeout:.0f} s waiting for {what}\n{details()}"
            )
        time.sleep(0.1)


class Workbench:
    """One browser tab showing code-server's workbench for one workspace folder."""

    def __init__(self, context: BrowserContext, page: Page, details: Callable[[], str] = str):
        self.context = context
        self.page = page
        self._details = details

    @classmethod
    def open(cls, browser: Browser, url: str, details: Callable[[], str] = str) -> Workbench:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.add_init_script(PROBE)
        page = context.new_page()
        page.goto(url)
        bench = cls(context, page, details)
        bench.wait(
            lambda: page.query_selector(".monaco-workbench .part.statusbar"), "the workbench"
        )
        return bench

    def close(self) -> None:
        self.context.close()

    # -- waiting and reporting ------------------------------------------------------------------

    def details(self) -> str:
        try:
            notes = "\n".join(f"  {n.source}: {n.message} {n.buttons}" for n in self.notes())
            status = self.status()
        except Exception as exc:  # the page itself may be what failed
            return f"(page unreadable: {exc})\n{self._details()}"
        return (
            f"status bar item: {status!r}\nnotifications:\n{notes or '  (none)'}\n{self._details()}"
        )

    def wait(self, check: Callable[[], T], what: str, timeout: float = LOAD_TIMEOUT_S) -> T:
        return wait_for(check, timeout, what, self.details)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))

    # -- what the user sees ---------------------------------------------------------------------

    def status(self) -> str | None:
        """The maskfill status bar item's accessible text: its text, then its tooltip."""
        item = self.page.query_selector(STATUS_ITEM)
        return item.get_attribute("aria-label") if item else None

    def wait_status(self, pattern: str, timeout: float = LOAD_TIMEOUT_S) -> str:
        regex = re.compile(pattern)
        return self.wait(
            lambda: (s := self.status()) is not None and regex.search(s) and s,
            f"the status bar item to match {pattern!r}",
            timeout,
        )

    def notes(self) -> list[Note]:
        raw: list[dict[str, Any]] = self.page.evaluate("window.__maskfillProbe.notes")
        return [Note(**n) for n in raw]

    def wait_note(self, text: str, timeout: float = LOAD_TIMEOUT_S) -> Note:
        def found() -> Note | None:
            return next((n for n in self.notes() if text in n.message), None)

        return self.wait(found, f"a notification saying {text!r}", timeout)

    def click_note_button(self, text: str, button: str) -> None:
        """Click `button` on the notification saying `text` (from the list if its toast hid)."""
        selector = (
            f'.notification-list-item:has(.notification-list-item-message:has-text("{text}"))'
        )

        def shown():
            return self.page.query_selector(selector)

        if not shown():
            self.command("Notifications: Show Notifications")
        item = self.wait(shown, f"the notification saying {text!r}", 10)
        buttons = item.query_selector_all(
            ".notification-list-item-buttons-container .monaco-button"
        )
        target = next((b for b in buttons if b.text_content().strip() == button), None)
        assert target is not None, f"no {button!r} button on {text!r}\n{self.details()}"
        target.click()

    def ghost(self) -> str:
        """The inline suggestion shown in the focused editor ("" when none)."""
        return self.page.evaluate("window.__maskfillProbe.ghost()")

    def wait_ghost(self, timeout: float = LOAD_TIMEOUT_S) -> str:
        return self.wait(self.ghost, "ghost text in the editor", timeout)

    def hint(self) -> str:
        """The inline suggestion toolbar's counter, "2/3" ("" when hidden)."""
        counter = self.page.query_selector(".inlineSuggestionsHints .availableSuggestionCount")
        return counter.text_content().strip() if counter and counter.is_visible() else ""

    def cursor(self) -> str:
        item = self.page.query_selector(CURSOR_ITEM)
        return item.text_content().strip() if item else ""

    def active_tab(self) -> str:
        tab = self.page.query_selector(".tabs-container .tab.active")
        return (tab.get_attribute("aria-label") or "") if tab else ""

    def panel_text(self) -> str:
        """What the panel (the Output view among others) shows."""
        panel = self.page.query_selector(".part.panel")
        text = panel.inner_text() if panel and panel.is_visible() else ""
        return re.sub(r"\s+", " ", text.replace("\xa0", " "))  # wrapped lines, editor spaces

    # -- what the user does ---------------------------------------------------------------------

    def press(self, key: str) -> None:
        self.page.keyboard.press(key)

    def type(self, text: str) -> None:
        self.page.keyboard.type(text)

    def command(self, title: str) -> None:
        """Run a command from the palette by its title, as a user types it."""
        self.press("F1")
        box = self.wait(lambda: self.page.query_selector(f"{QUICK_INPUT} input"), "the palette", 10)
        box.fill(f">{title}")

        def listed() -> bool:
            row = self.page.query_selector(f"{QUICK_INPUT} .monaco-list-row.focused")
            return bool(row and (row.get_attribute("aria-label") or "").startswith(title))

        self.wait(listed, f"the command {title!r} in the palette", 10)
        self.press("Enter")

    def open_file(self, name: str) -> None:
        """Open a file of the workspace from the explorer (a double click: not a preview)."""
        row = self.wait(
            lambda: self.page.query_selector(
                f'.explorer-folders-view .monaco-list-row[aria-label^="{name}"]'
            ),
            f"{name} in the explorer",
        )
        row.dblclick()
        self._wait_editor(name)

    def quick_open(self, name: str) -> None:
        """Open a workspace file by name (Quick Open, Ctrl+P)."""
        self.press("Control+P")
        box = self.wait(lambda: self.page.query_selector(f"{QUICK_INPUT} input"), "Quick Open", 10)
        box.fill(name)

        def listed() -> bool:
            row = self.page.query_selector(f"{QUICK_INPUT} .monaco-list-row.focused")
            return bool(row and (row.get_attribute("aria-label") or "").startswith(name))

        self.wait(listed, f"{name} in Quick Open", 20)
        self.press("Enter")
        self._wait_editor(name)

    def _wait_editor(self, name: str) -> None:
        self.wait(
            lambda: (
                self.active_tab().startswith(name)
                and self.page.query_selector(".monaco-editor.focused")
            ),
            f"{name} open in a focused editor",
            30,
        )

    def go_to(self, line: int, column: int) -> None:
        """Put the cursor at 1-based `line`, `column` (Go to Line/Column, Ctrl+G)."""
        self.press("Control+G")
        box = self.wait(lambda: self.page.query_selector(f"{QUICK_INPUT} input"), "Go to Line", 10)
        box.fill(f":{line}:{column}")
        self.press("Enter")
        where = f"Ln {line}, Col {column}"
        self.wait(lambda: self.cursor() == where, f"the cursor at {where}", 10)
