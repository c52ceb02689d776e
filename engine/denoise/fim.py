"""Fill-in-the-middle layout: the family's infill prompt, the window cut, and result trimming.

Layout (models.md §3): `[BOS]? + prefix + [MASK]*L + suffix + [EOS]?`, the optional specials set by
the checkpoint's ModelArgs (Dream: both, Open-dCoder: neither, LLaDA: BOS only). Several rows (hole
buckets, candidates) share one prefix, so every row's hole starts at the same column; rows are
right-padded and carry a key_valid mask. Positions are 0..len-1 per row.

Stop modes cut the decoded text: "line" at the first newline, "block" where a non-empty line
dedents out of the block the cursor is in, "free" only at the end token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from engine.model.config import ModelArgs

if TYPE_CHECKING:  # torch is imported where the rows are built: the LSP server, which never
    import torch  # imports torch, pre-cuts its window with precut_text
    from torch import Tensor

# A token spans at least one character, and code BPE tokens rarely exceed a few dozen: texts are
# pre-cut to this many characters per budget token before tokenizing, so an enormous file never
# gets tokenized whole (nor sent whole: the LSP server pre-cuts its window with the same
# precut_text). The exact cut is then made on tokens (cut_context): the one context cut.
CHARS_PER_TOKEN_BOUND = 32
PREFIX_SHARE = 0.75  # when both sides are too long, keep about 3:1 prefix:suffix


def lead_specials(args: ModelArgs) -> list[int]:
    """Tokens before the prefix: [BOS] where the family's layout has one. (Shifted models
    predict hole slot 0 from the token before it; build_infill_batch adds an EOS as a document
    boundary when there is no token at all before the hole.)"""
    if args.infill_bos and args.bos_token_id is not None:
        return [args.bos_token_id]
    return []


def trail_specials(args: ModelArgs) -> list[int]:
    return [args.eos_token_id] if args.infill_eos else []


def context_budget(args: ModelArgs, hole_length: int, max_context_tokens: int | None) -> int:
    """Prefix + suffix tokens that fit beside the specials, a shift anchor and the longest hole."""
    window = args.max_context if max_context_tokens is None else min(
        args.max_context, max_context_tokens
    )
    specials = len(lead_specials(args)) + len(trail_specials(args))
    anchor = 1 if args.logit_shift and not lead_specials(args) else 0
    return window - specials - anchor - hole_length


def precut_text(prefix: str, suffix: str, budget_tokens: int) -> tuple[str, str]:
    """Drop characters that can never fit (left of the prefix, right of the suffix)."""
    limit = max(budget_tokens, 0) * CHARS_PER_TOKEN_BOUND
    if len(prefix) > limit:
        prefix = prefix[len(prefix) - limit:]
    if len(suffix) > limit:
        suffix = suffix[:limit]
    return prefix, suffix


# Tokens dropped at the cut end of a piece tokenized on its own: a merge across the cut (a
# run of blank lines, say) can make them differ from the whole text's; the rest never do.
PIECE_MARGIN_TOKENS = 16
PIECE_CHARS_PER_TOKEN = 4  # the first guess at a piece's size; doubled while it falls short


def tokens_near_hole(encode: Callable[[str], list[int]], text: str, need: int, *,
                     before: bool) -> list[int]:
    """At least `need` of `text`'s tokens nearest the hole (all of them when it has fewer),
    without tokenizing the rest: a piece next to the hole, cut at a line boundary, grows until
    it holds `need` tokens past the margin. `before`: `text` is the prefix (keep its end).
    Each keystroke then costs what the budget holds, not what the editor sent."""
    chars = (max(need, 0) + PIECE_MARGIN_TOKENS) * PIECE_CHARS_PER_TOKEN
    while chars < len(text):
        if before:
            cut = text.rfind("\n", 0, len(text) - chars)
            piece = text[cut + 1:] if cut >= 0 else text
        else:
            cut = text.find("\n", chars)
            piece = text[:cut + 1] if cut >= 0 else text
        if len(piece) == len(text):
            break
        ids = encode(piece)
        if len(ids) >= need + PIECE_MARGIN_TOKENS:
            return ids[PIECE_MARGIN_TOKENS:] if before else ids[:-PIECE_MARGIN_TOKENS]
        chars *= 2
    return encode(text)


def context_near_hole(encode: Callable[[str], list[int]], prefix: str, suffix: str,
                      budget: int) -> tuple[list[int], list[int]]:
    """`cut_context` of the whole texts' tokens, tokenizing only the pieces it can keep: the
    suffix's share first, then the prefix, then more suffix if the prefix came up short."""
    budget = max(budget, 0)
    floor = budget - int(budget * PREFIX_SHARE)
    suffix_ids = tokens_near_hole(encode, suffix, floor, before=False)
    prefix_ids = tokens_near_hole(encode, prefix, budget - min(len(suffix_ids), floor),
                                  before=True)
    if len(suffix_ids) >= floor and len(prefix_ids) < budget - floor:
        suffix_ids = tokens_near_hole(encode, suffix, budget - len(prefix_ids), before=False)
    return cut_context(prefix_ids, suffix_ids, budget)


def cut_context(
    prefix_ids: list[int], suffix_ids: list[int], budget: int
) -> tuple[list[int], list[int]]:
    """Cut the prefix on the left and the suffix on the right to fit `budget` tokens in total.

    A short side keeps everything and the other side takes the rest; when both are long the
    prefix keeps about 3/4 (it says more about the hole than the code after it)."""
    budget = max(budget, 0)
    if len(prefix_ids) + len(suffix_ids) <= budget:
        return prefix_ids, suffix_ids
    suffix_floor = budget - int(budget * PREFIX_SHARE)
    keep_suffix = min(len(suffix_ids), max(budget - len(prefix_ids), suffix_floor))
    keep_prefix = min(len(prefix_ids), budget - keep_suffix)
    keep_suffix = min(len(suffix_ids), budget - keep_prefix)
    return prefix_ids[len(prefix_ids) - keep_prefix:], suffix_ids[:keep_suffix]


@dataclass
class InfillBatch:
    """Rows `lead + prefix + MASK*L_r + suffix + trail`, right-padded; holes share hole_start."""

    ids: Tensor  # (B, T) long
    positions: Tensor  # (B, T) long, 0..len-1 per row
    key_valid: Tensor  # (B, T) bool, False on padding
    hole_start: int  # column of every row's first hole slot
    hole_lengths: list[int]  # L_r per row
    hole_valid: Tensor  # (B, Lmax) bool, True on the row's own hole slots

    @property
    def max_hole(self) -> int:
        return max(self.hole_lengths)

    def hole(self) -> Tensor:
        """(B, Lmax) view of the hole columns (suffix tokens where hole_valid is False)."""
        return self.ids[:, self.hole_start:self.hole_start + self.max_hole]

    def to(self, device: torch.device) -> InfillBatch:
        """The same rows on `device` (itself when they are there already)."""
        if self.ids.device == device:
            return self
        return replace(self, ids=self.ids.to(device), positions=self.positions.to(device),
                       key_valid=self.key_valid.to(device), hole_valid=self.hole_valid.to(device))


def build_infill_batch(
    args: ModelArgs,
    prefix_ids: list[int],
    suffix_ids: list[int],
    hole_lengths: list[int],
    device: torch.device | str = "cpu",
) -> InfillBatch:
    import torch

    lead = lead_specials(args) + list(prefix_ids)
    if args.logit_shift and not lead:
        lead = [args.eos_token_id]  # anchor for the shift: see lead_specials
    tail = list(suffix_ids) + trail_specials(args)
    rows = [lead + [args.mask_token_id] * n + tail for n in hole_lengths]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), args.pad_token_id, dtype=torch.long)
    key_valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        key_valid[i, : len(row)] = True
    positions = torch.arange(width).expand(len(rows), width).clone()
    lmax = max(hole_lengths)
    hole_valid = torch.arange(lmax)[None, :] < torch.tensor(hole_lengths)[:, None]
    return InfillBatch(
        ids=ids.to(device),
        positions=positions.to(device),
        key_valid=key_valid.to(device),
        hole_start=len(lead),
        hole_lengths=list(hole_lengths),
        hole_valid=hole_valid.to(device),
    )


def trim_at_end(tokens: list[int], end_ids: set[int], mask_id: int) -> tuple[list[int], bool]:
    """Tokens before the first end token; `ended` when one closed the span. A still-masked slot
    (cancelled or timed-out decoding) also ends the usable text, without counting as ended."""
    for i, tok in enumerate(tokens):
        if tok in end_ids:
            return tokens[:i], True
        if tok == mask_id:
            return tokens[:i], False
    return tokens, False
