"""SAFIM-style syntax cut of a fill-in-the-middle candidate (design/context.md §6).

A candidate is *accepted* when the file with it in the hole

1. has no syntax error that the file without it lacked (errors elsewhere in a half-typed file
   are the user's, and are tolerated where they were), and
2. keeps its shape outside the hole: every token after the hole (from the next line on when
   the hole is mid-line; within WINDOW bytes) has the same type, the same position relative
   to the hole's end and the same chain of ancestors as in the file without the candidate.
   This rejects `if x:` written above existing lines, which parses but makes them its body.

The reference file is prefix + filler + suffix, with the first filler (SAFIM uses `pass` for
Python) that leaves no error at the hole. When none does, the check has no opinion.

`truncate` drops trailing lines until the candidate is accepted, then, as a last resort, cuts
the first line at token boundaries. Every parse is incremental from one parse of the file
without the candidate (about 1 ms per check on a 2k-line file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lsp_server.syntax.document_tree import utf8
from lsp_server.syntax.languages import new_parser

WINDOW = 2048  # bytes after (and before) the hole whose nodes must keep their shape
MAX_LINE_CUTS = 24  # token-boundary cuts of the first line tried before giving up
FILLERS: dict[str, tuple[str, ...]] = {"python": ("", "pass", "x")}
DEFAULT_FILLERS = ("", "x", "0")
EMPTY_BODY_TYPES = frozenset({"block"})  # a zero-width one is a body left empty
INDENTED = frozenset({"python"})  # grammars whose blocks are set by indentation
# Python nodes that may hold a block: the walks for empty bodies and indentation go through
# these only, not into expressions (a few dozen nodes near the hole instead of thousands).
BLOCK_HOLDERS = frozenset({
    "module", "block", "if_statement", "for_statement", "while_statement", "try_statement",
    "with_statement", "match_statement", "function_definition", "class_definition",
    "decorated_definition", "elif_clause", "else_clause", "except_clause",
    "except_group_clause", "finally_clause", "case_clause",
})
HEADER_FILLER = "if x:"
_BOUNDARY = re.compile(r"(?<=\w)(?=\W)|(?<=\W)(?=\w)|(?<=[^\w\s])(?=[^\w\s])")


@dataclass(frozen=True)
class Cut:
    """A candidate after the syntax cut. `parses`: True (accepted as `text`), False (no cut of
    it is accepted: `text` is the candidate unchanged), None (no opinion: no grammar, or the
    file around the hole is broken whatever the hole holds)."""

    text: str
    parses: bool | None
    lines_dropped: int = 0


class HoleCheck:
    """Checks candidates for one hole: `before` + candidate + `after` is the whole file (or the
    part of it the model saw). Build once per request; `accepts`/`truncate` per candidate."""

    def __init__(self, grammar: str | None, before: str, after: str, tree=None):
        """`tree`: a parse of `before + after` already at hand (the document's own tree when
        the hole's context is the whole document), saving the one full parse."""
        self.grammar = grammar
        self._parser = new_parser(grammar)
        self._before = utf8(before)
        self._after = utf8(after)
        self.hole = len(self._before)  # byte offset of the hole
        self.checks = 0  # parses done for candidates
        self.filler: str | None = None  # the first reference's filler
        self._judged: dict[str, bool] = {}  # accepts() by candidate
        self._tolerated: frozenset = frozenset()
        # (header?, signature) of each reference: the file with a filler that leaves no
        # error at the hole; at most one with a block header and one without.
        self._references: list[tuple[bool, tuple]] = []
        # Where the suffix's checked nodes begin: its whole first line when the hole starts a
        # line (text written before it must end with a line break, not swallow it), else
        # after that line (a mid-line candidate may rightly regroup the line's rest:
        # `foo(|y)` + `x + ` puts `y` under a new binary operator).
        line_head = self._before[self._before.rfind(b"\n") + 1 :]
        next_line = self._after.find(b"\n")
        self._lead = len(self._after) - len(self._after.lstrip())
        self._unchecked_after = (
            0 if not line_head.strip() else len(self._after) if next_line == -1 else next_line + 1
        )
        if self._parser is None:
            return
        self._empty = tree if tree is not None else self._parser.parse(self._before + self._after)
        for filler in self._fillers(before, after):
            inserted = utf8(filler)
            tree = self._tree_with(inserted) if filler else self._empty
            end = self.hole + len(inserted)
            header = filler.strip() == HEADER_FILLER
            if any(kind == header for kind, _ in self._references):
                continue
            if all(self._error_key(e, end) is not None for e in self._problems(tree, inserted)):
                if self.filler is None:
                    self.filler = filler
                self._references.append((header, self._signature(tree, inserted, header)))
                if len(self._references) == 2:
                    break
        # Errors some reference has too: a candidate with any other one is refused at once.
        self._tolerated = frozenset().union(*(errors for _, (errors, _) in self._references))

    def _fillers(self, before: str, after: str) -> list[str]:
        """Reference fillers to try. For a hole at the start of a line of an indented
        language, also `pass` at the indentations the lines around suggest, and a block
        header (`if x:`) for when the lines below are indented as a body of something in
        the hole; the header comes first when they are deeper than a body there would be."""
        fillers = list(FILLERS.get(self.grammar or "", DEFAULT_FILLERS))
        if self.grammar not in INDENTED or (before and not before.endswith("\n")):
            return fillers
        above = next((ln for ln in reversed(before[-4096:].split("\n")) if ln.strip()), "")
        below = next((ln for ln in after[:4096].split("\n") if ln.strip()), "")
        above_indent = above[: len(above) - len(above.lstrip())]
        below_indent = below[: len(below) - len(below.lstrip())]
        unit = "\t" if (above_indent + below_indent).startswith("\t") else "    "
        body = above_indent + unit if above.rstrip().endswith(":") else above_indent
        # A suffix that starts with code on the hole's line needs a line break.
        end = "" if after.startswith(("\n", "\r")) else "\n"
        passes = [f"{indent}pass{end}" for indent in dict.fromkeys(
            (above_indent + unit, above_indent, below_indent)) if indent]
        header_indent = below_indent[: -len(unit)] if below_indent.endswith(unit) else ""
        headers = [f"{indent}{HEADER_FILLER}\n" for indent in dict.fromkeys(
            (header_indent, above_indent, above_indent + unit))]
        if _width(below) <= _width(above):
            return [*fillers, *passes]  # nothing below the hole could be a header's body
        if _width(below) > _width(body):
            return [*headers, *fillers, *passes]
        return [*fillers, *passes, *headers]

    @property
    def has_opinion(self) -> bool:
        return self.filler is not None

    def _tree_with(self, inserted: bytes):
        tree = self._empty.copy()
        row, column = _point(self._before, self.hole)
        end = self.hole + len(inserted)
        tree.edit(
            start_byte=self.hole,
            old_end_byte=self.hole,
            new_end_byte=end,
            start_point=(row, column),
            old_end_point=(row, column),
            new_end_point=_point(self._before + inserted, end),
        )
        return self._parser.parse(self._before + inserted + self._after, tree)

    def _problems(self, tree, inserted: bytes):
        """Error nodes, plus what tree-sitter-python lets pass and Python refuses: an empty
        block body, a statement indented off its block's column (lazily: a candidate is
        usually refused on the first)."""
        root = tree.root_node
        low, high = self.hole - WINDOW, self.hole + len(inserted) + WINDOW
        yield from _errors(root)
        yield from _empty_blocks(root, low, high)
        if self.grammar in INDENTED:
            yield from _indent_errors(root, self._before + inserted + self._after, low, high)

    def _signature(self, tree, inserted: bytes, header: bool):
        """(errors, shape) of a tree whose hole holds `inserted`; `header`: compare the
        types of nodes starting in the hole loosely (_suffix_leaves)."""
        return (self._error_keys(tree, inserted),
                (tuple(self._prefix_shape(tree)),
                 tuple(self._suffix_shape(tree, inserted, header))))

    def _error_keys(self, tree, inserted: bytes) -> frozenset:
        hole_end = self.hole + len(inserted)
        return frozenset(self._error_key(e, hole_end) for e in self._problems(tree, inserted))

    def _error_keys_within(self, tree, inserted: bytes, tolerated: frozenset):
        """The tree's error keys, or None as soon as one is not in `tolerated`."""
        hole_end = self.hole + len(inserted)
        keys = set()
        for problem in self._problems(tree, inserted):
            key = self._error_key(problem, hole_end)
            if key is None or key not in tolerated:
                return None
            keys.add(key)
        return keys

    def _prefix_shape(self, tree):
        return _prefix_leaves(tree.root_node, self.hole)

    def _suffix_shape(self, tree, inserted: bytes, header: bool):
        hole_end = self.hole + len(inserted)
        return _suffix_leaves(tree.root_node, self.hole, hole_end,
                              hole_end + self._unchecked_after, self._lead, header)

    def _error_key(self, node, hole_end: int):
        """An error's place in terms that do not depend on the hole's content; None when it
        touches the hole (only blanks between them)."""
        hole = self.hole
        if node.end_byte <= hole and self._before[node.end_byte : hole].strip():
            return ("before", node.type, node.start_byte, node.end_byte)
        after_start = node.start_byte - hole_end
        if node.start_byte >= hole_end and self._after[:after_start].strip():
            return ("after", node.type, after_start, node.end_byte - hole_end)
        return None

    def accepts(self, candidate: str) -> bool | None:
        """Whether the file with `candidate` in the hole parses and keeps its shape.

        Each distinct candidate is parsed once (the rows of one request share most of the
        cuts `truncate` tries); its errors are judged before its shape, and the shape is
        walked only as far as it matches a reference's (most rejected cuts fail on errors)."""
        if not self.has_opinion:
            return None
        known = self._judged.get(candidate)
        if known is not None:
            return known
        inserted = utf8(candidate)
        self.checks += 1
        tree = self._tree_with(inserted)
        errors = self._error_keys_within(tree, inserted, self._tolerated)
        accepted = False
        if errors is not None:
            # A candidate that opens what the suffix continues (see _opens_block) needs no
            # shape match.
            opens = None
            prefix: list = []  # the candidate's prefix leaves, as far as walked
            walk = None
            for header, (reference_errors, (reference_prefix, reference_suffix)) in (
                    self._references):
                if not errors <= reference_errors:
                    continue
                if opens is None:
                    opens = self._opens_block(candidate)
                if opens:
                    accepted = True
                    break
                if walk is None:  # the first comparison walks only as far as it matches
                    walk = _collect(self._prefix_shape(tree), prefix)
                    same_prefix = _same(walk, reference_prefix)
                else:
                    for _ in walk:  # walk the rest (the references' prefixes may differ)
                        pass
                    same_prefix = tuple(prefix) == reference_prefix
                if same_prefix and _same(self._suffix_shape(tree, inserted, header),
                                         reference_suffix):
                    accepted = True
                    break
        self._judged[candidate] = accepted
        return accepted

    def _opens_block(self, candidate: str) -> bool:
        """The candidate's last line opens a block or a bracket (`else:`, `for ...:`, `{`,
        `foo(`) and the suffix's next line is indented deeper than it: then the suffix was
        meant as its body or its rest, and only the error check applies. A line opening a
        block over a suffix at its own depth (`int g() {` above `}`) keeps the shape check.
        """
        last = next((ln for ln in reversed(candidate.split("\n")) if ln.strip()), "")
        code = last.split(" #")[0].rstrip() if self.grammar in INDENTED else last.rstrip()
        openers = (":", "(", "[", "{") if self.grammar in INDENTED else ("(", "[", "{")
        if not code.endswith(openers):
            return False
        after = self._after[:4096].decode("utf-8", "replace")
        if not candidate.endswith("\n"):
            line_rest, newline, after = after.partition("\n")
            if line_rest.strip() or not newline:
                return False
        below = next((ln for ln in after.split("\n") if ln.strip()), "")
        return _width(below) > _width(last)

    def truncate(self, candidate: str) -> Cut:
        """Drop trailing lines until accepted; then cut the first line at token boundaries.
        An empty or all-blank cut is never accepted: "parses when empty" is no signal."""
        if not self.has_opinion:
            return Cut(candidate, None)
        lines = candidate.split("\n")
        for keep in range(len(lines), 0, -1):
            text = "\n".join(lines[:keep])
            if not text.strip():
                break
            variants = (text,) if keep == len(lines) else (text, text + "\n")
            for variant in variants:
                if self.accepts(variant):
                    return Cut(variant, True, len(lines) - keep)
        first = lines[0]
        for end in _line_cuts(first):
            if self.accepts(first[:end]):
                return Cut(first[:end], True, len(lines) - 1)
        return Cut(candidate, False)


def _same(items, reference: tuple) -> bool:
    """Whether the iterable `items` equals `reference`, stopping at the first difference."""
    count = 0
    for count, item in enumerate(items, 1):
        if count > len(reference) or item != reference[count - 1]:
            return False
    return count == len(reference)


def _collect(items, into: list):
    """`items`, each also appended to `into` as it is produced."""
    for item in items:
        into.append(item)
        yield item


def _width(line: str) -> int:
    expanded = line.expandtabs(4)
    return len(expanded) - len(expanded.lstrip())


def _line_cuts(line: str) -> list[int]:
    """Token-boundary cut points of `line`, longest first (at most MAX_LINE_CUTS)."""
    ends = sorted({m.start() for m in _BOUNDARY.finditer(line) if line[: m.start()].strip()},
                  reverse=True)
    return ends[:MAX_LINE_CUTS]


def _point(source: bytes, byte_offset: int) -> tuple[int, int]:
    return (source.count(b"\n", 0, byte_offset),
            byte_offset - (source.rfind(b"\n", 0, byte_offset) + 1))


def _errors(root):
    """ERROR and MISSING nodes, visiting only subtrees that hold one; lazily: a candidate is
    usually refused on the first (the whole walk was ~14% of a junk row's cut, ~9% now)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if not node.has_error:
            continue
        if node.is_error or node.is_missing:
            yield node
            if node.is_missing:
                continue
        children = node.children
        if not node.is_error and not any(child.has_error for child in children):
            yield node  # it holds a hidden MISSING token (Python's `_newline`)
        stack.extend(children)


def _children_in(node, low: int, high: int):
    """The node's children overlapping [low, high], found without listing all of them (a
    class or module body may hold hundreds)."""
    if node.child_count == 0:
        return
    cursor = node.walk()
    found = (cursor.goto_first_child_for_byte(low) is not None if low > node.start_byte
             else cursor.goto_first_child())
    while found and cursor.node.start_byte <= high:
        yield cursor.node
        found = cursor.goto_next_sibling()


def _empty_blocks(root, low: int, high: int) -> list:
    """Zero-width `block` nodes overlapping [low, high]: tree-sitter-python parses `if a:`
    with nothing under it as an empty block, without an error; here it counts as one."""
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.start_byte == node.end_byte:
            if node.type in EMPTY_BODY_TYPES and not node.is_missing:
                found.append(node)
            continue
        stack.extend(c for c in _children_in(node, low, high) if c.type in BLOCK_HOLDERS)
    return found


def _line_indent(source: bytes, byte: int) -> bytes | None:
    """The blanks before `byte` on its line, or None when code precedes it there."""
    head = source[source.rfind(b"\n", 0, byte) + 1 : byte]
    return None if head.strip() else head


def _indent_errors(root, source: bytes, low: int, high: int) -> list:
    """Statements of a block (or the module) within [low, high] that start their line at
    another indentation than the block's first statement, or a first statement not deeper
    than the block's owner: Python's "unexpected indent" and "unindent does not match",
    which tree-sitter accepts."""
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.type in ("block", "module"):
            column = b"" if node.type == "module" else None
            first = None
            if column is None:
                child = node.named_child(0) if node.named_child_count else None
                while child is not None and (
                    child.type == "comment" or _line_indent(source, child.start_byte) is None
                ):
                    child = child.next_named_sibling
                if child is not None:
                    first, column = child, _line_indent(source, child.start_byte)
                    owner = node.parent
                    floor = _line_indent(source, owner.start_byte) if owner else None
                    if floor is not None and len(column) <= len(floor) and (
                        low <= child.start_byte <= high
                    ):
                        found.append(child)
            for child in _children_in(node, low, high):
                if not child.is_named or child.type == "comment" or child == first:
                    continue
                indent = _line_indent(source, child.start_byte)
                if indent is not None and column is not None and indent != column:
                    found.append(child)
        stack.extend(c for c in _children_in(node, low, high) if c.type in BLOCK_HOLDERS)
    return found


def _prefix_leaves(root, hole: int):
    """Leaves (tokens) ending before the hole, within WINDOW bytes of it."""
    low = hole - WINDOW
    stack = [root]
    while stack:
        node = stack.pop()
        if node.end_byte <= low or node.start_byte >= hole:
            continue
        if node.child_count == 0:
            if node.start_byte < node.end_byte < hole:
                yield (node.start_byte, node.end_byte, node.type)
            continue
        stack.extend(reversed(list(_children_in(node, low, hole))))


def _suffix_leaves(root, hole: int, hole_end: int, first: int, lead: int, header: bool):
    """Tokens starting at or after byte `first` and within WINDOW bytes of the hole's end:
    (start, end) relative to hole_end, type, and the chain of their ancestors' types, each
    tagged with where it starts: "p" before the hole; "x" in the hole or at the suffix's
    first token (`lead` bytes of blanks after the hole), which a candidate may rightly
    move (a block starting one statement earlier); else the offset into the suffix. With
    `header` (the hole holds a block header the suffix is the body of), ancestors starting in
    the hole keep only their tag: the candidate's `for`/`while`/`def` stands where the
    reference has `if x:`."""
    limit = hole_end + WINDOW
    stack = [(root, ())]
    while stack:
        node, chain = stack.pop()
        start, end = node.start_byte, node.end_byte
        if start >= limit or end <= first:
            continue
        if node.child_count == 0:
            if start >= first and start < end:
                yield (start - hole_end, end - hole_end, node.type, chain)
            continue
        where = "p" if start < hole else "x" if start <= hole_end + lead else start - hole_end
        kind = "*" if header and hole <= start < hole_end else node.type
        chain = (*chain, (kind, where))
        stack.extend((child, chain) for child in reversed(list(_children_in(node, first, limit))))
