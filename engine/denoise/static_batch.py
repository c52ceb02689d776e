"""Requests in flight together on fixed shapes: one static pass serves all their rows.

Each request (a `StaticMember`) owns consecutive rows of PassCache's shared arena. The pass
shape is (batch bucket of all rows, the widest context bucket, the widest query bucket) among
the members, so on CUDA a handful of captured graphs serves any mix of requests. A member's
context region never moves while it is in flight: a shape change only rewrites the pass's
inputs (query ids, RoPE tables, key bias), because a static pass recomputes the whole query
block's K/V every time. A member that leaves frees its rows; the members after it move up
(one copy of their rows), so the batch stays as small as its requests.

Joining happens between passes: the newcomer's context is encoded into its rows, or its reused
K/V are written there (engine/denoise/prefill.py); its first logits come from that encode or from
the next shared pass. When a newcomer's context came from the cache, that next pass is a join pass:
the same shape plus a bucket of entries (buckets.REFRESH_BUCKETS) that compute its changed
context tokens, so a warm request costs no pass of its own and replays a graph too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from engine.denoise.buckets import BATCH_BUCKETS, REFRESH_BUCKETS
from engine.denoise.context_cache import ReusePlan
from engine.denoise.fim import InfillBatch
from engine.denoise.graphs import PassCache
from engine.denoise.kv_arena import (
    ALIGN,
    KVArena,
    Layout,
    bucket,
    encode_rows,
    key_bias,
    query_ids,
    query_rope,
)
from engine.denoise.passes import InFlight, StaticPass
from engine.denoise.prefill import Prefilled, fill, joined_entry
from engine.model.config import ModelArgs
from engine.model.transformer import rope_tables


@dataclass(eq=False)
class StaticMember:
    batch: InfillBatch
    layout: Layout  # the request's own (its buckets); placed in the shared shape when run
    start: int  # first row in the arena
    hole: Tensor | None = None  # (rows, lmax) view of the pass's query ids
    first: Tensor | None = None
    prefilled: Prefilled | None = field(default=None, repr=False)
    joined: bool = False  # a warm member's join pass ran; its context not yet cached
    group: StaticBatch | None = field(default=None, repr=False)  # the batch it is a member of

    shrinks = False

    @property
    def rows(self) -> int:
        return self.layout.rows

    # ---- the Source protocol (engine/denoise/passes.py): the batch does the work

    def new_entry(self):
        return self.group.new_entry(self)

    def select(self, local: Tensor) -> None:
        pass  # never called: a static pass keeps its rows

    def refresh(self, ids: Tensor) -> None:
        self.group.refresh(self, ids)

    def leave(self) -> None:
        self.group.leave(self)


class StaticBatch:
    def __init__(self, model, args: ModelArgs, passes: PassCache, banned_ids: Tensor):
        self.model, self.args, self.passes, self.banned_ids = model, args, passes, banned_ids
        self.members: list[StaticMember] = []
        self.static: StaticPass | None = None

    @property
    def rows(self) -> int:
        return sum(m.rows for m in self.members)

    def join(self, batch: InfillBatch, layout: Layout, plan: ReusePlan | None,
             context: tuple[Tensor, Tensor] | None, keep: bool) -> StaticMember:
        member = StaticMember(batch, layout, start=self.rows, group=self)
        self._reshape(self.members + [member])
        try:
            member.prefilled = fill(self.model, self.args, batch, self._rows(member),
                                    self.banned_ids, plan, context, keep)
        except BaseException:
            self.leave(member)
            raise
        member.first = member.prefilled.first
        return member

    def new_entry(self, member: StaticMember):
        """A warm member's context for the cache, once its join pass ran (then None)."""
        pre = member.prefilled
        if pre is None or pre.lead is None or not member.joined:
            return None
        member.joined = False
        return joined_entry(pre, self._rows(member), member.batch)

    def leave(self, member: StaticMember) -> None:
        """Free its rows; the members after it move up."""
        if member not in self.members:
            return
        at = self.members.index(member)
        rest = self.members[:at] + self.members[at + 1:]
        arena = self._arena()
        start = member.start
        for later in self.members[at + 1:]:
            if arena is not None:  # its context only: every pass rewrites the query block
                src = slice(later.start, later.start + later.rows)
                dst = slice(start, start + later.rows)
                used = later.layout.context_used
                for buffer in (*arena.k, *arena.v):
                    buffer[dst, :, :used] = buffer[src, :, :used].clone()
            later.start = start
            start += later.rows
        self._reshape(rest)

    def run(self, requests: list[InFlight]) -> list[Tensor]:
        """The PassGroup of every member: one pass, each request's share of it."""
        by_member = self.logits()
        return [by_member[r.source] for r in requests]

    def logits(self) -> dict[StaticMember, Tensor]:
        """One pass for every member -> each member's (rows, lmax, V) logits (views of the
        pass's output: read them before the next pass)."""
        joining = [m for m in self.members if m.prefilled and m.prefilled.join is not None]
        changed = [m for m in joining if m.prefilled.join.width]
        out = self._join_pass(changed).logits() if changed else self.static.logits()
        for m in joining:
            m.prefilled.join = None
            m.joined = True
        return {m: out[m.start:m.start + m.rows, :m.layout.lmax] for m in self.members}

    def _join_pass(self, joining: list[StaticMember]):
        """The current shape with room for the joiners' changed tokens, its inputs filled."""
        static = self.static
        width = bucket(max(m.prefilled.join.width for m in joining), REFRESH_BUCKETS)
        joined = self.passes.get(static.layout, refresh=width, arena=static.arena)
        joined.qids[:, :width] = self.args.pad_token_id
        joined.qids[:, width:] = static.qids
        for mine, theirs in ((joined.rope.cos, static.rope.cos),
                             (joined.rope.sin, static.rope.sin)):
            mine[:, :width] = 0
            mine[:, width:] = theirs
        joined.bias.copy_(static.bias)
        joined.columns[:, :width] = static.layout.scratch
        for m in joining:
            join = m.prefilled.join
            rows, n = slice(m.start, m.start + m.rows), join.width
            joined.qids[rows, :n] = join.ids
            rope = rope_tables(join.positions, self.args.head_dim,
                               self.args.rope_theta)
            joined.rope.cos[rows, :n] = rope.cos
            joined.rope.sin[rows, :n] = rope.sin
            joined.columns[rows, :n] = join.columns
        return joined

    def refresh(self, member: StaticMember, ids: Tensor) -> None:
        """Re-encode the member's rows with their current holes."""
        encode_rows(self.model, member.batch, ids, self._rows(member))

    # ---- internals

    def _arena(self) -> KVArena | None:
        return self.static.arena if self.static is not None else None

    def _rows(self, member: StaticMember) -> KVArena:
        placed = self._placed(member)
        arena = self.static.arena
        return arena.rows(member.start, member.start + member.rows, placed)

    def _placed(self, member: StaticMember) -> Layout:
        shape = self.static.layout
        return member.layout.placed(shape.context, shape.query, shape.length)

    def _reshape(self, members: list[StaticMember]) -> None:
        """Take the pass of the members' shape and fill its inputs; each member's hole keeps
        its committed tokens."""
        saved = {m: m.hole.clone() for m in members if m.hole is not None}
        self.members = members
        if not members:
            self.static = None
            return
        shift = members[0].layout.shift
        rows = sum(m.rows for m in members)
        context = max(m.layout.context for m in members)
        query = max(m.layout.query for m in members)
        length = -(-(context + query + 1) // ALIGN) * ALIGN
        n_batch = bucket(rows, BATCH_BUCKETS)
        shape = Layout(rows=rows, batch=n_batch, shift=shift, hole_start=shift,
                       lmax=query - shift, context_used=context, context=context, query=query,
                       length=length)
        previous = self.static
        oversize = n_batch > BATCH_BUCKETS[-1]  # a private arena (PassCache.get)
        if previous is not None and oversize != (previous.layout.batch > BATCH_BUCKETS[-1]):
            # Admission runs a request with more rows than the largest bucket alone.
            raise RuntimeError("a batch cannot move between the shared and a private arena")
        self.static = static = self.passes.get(
            shape, arena=previous.arena if previous is not None and oversize else None)
        device = static.qids.device
        static.qids.fill_(self.args.pad_token_id)
        static.rope.cos.zero_()
        static.rope.sin.zero_()
        bias = static.bias
        bias.fill_(float("-inf"))
        bias[:, :, :, 0] = 0  # padding rows attend one key: finite garbage nobody reads
        for m in members:
            placed = m.layout.placed(context, query, length)
            rows_m = slice(m.start, m.start + m.rows)
            key_bias(placed, m.batch.hole_lengths, bias[rows_m])
            rope = query_rope(placed, self.args, device)
            static.rope.cos[rows_m] = rope.cos
            static.rope.sin[rows_m] = rope.sin
            static.qids[rows_m] = query_ids(placed, m.batch, self.args.pad_token_id)
            m.hole = static.qids[rows_m, shift:shift + m.layout.lmax]
            if m in saved:
                m.hole.copy_(saved[m])
