"""DreamOn's variable-length infilling loop (models.md §4): the hole grows where EXPAND is
committed and shrinks where an end token fills a slot that was MASK at the step's start.

Batch 1, one commit per step, a full forward each step: expansions and deletions move the
suffix, so no cached K/V survives a step.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from engine.api import CompletionRequest
from engine.denoise import sampler
from engine.denoise.loop import Denoised, StopSignal
from engine.model.config import ModelArgs


def denoise_expanding(
    model,
    args: ModelArgs,
    lead: list[int],
    tail: list[int],
    request: CompletionRequest,
    *,
    initial_length: int,
    window: int,
    temperature: float,
    generator: torch.Generator,
    stop: StopSignal,
    device: torch.device,
    end_ids: set[int],
    banned_ids: Tensor,
) -> Denoised:
    """DreamOn (models.md §4): the hole grows where EXPAND is committed and shrinks where an end
    token fills a slot that was MASK at the step's start. One commit per step, full forward."""
    started = time.perf_counter()
    expand_id, mask_id = args.expand_token_id, args.mask_token_id
    hole = [mask_id] * initial_length
    budget = request.max_tokens  # expansions left (DreamOn: Lmax); cap bounds the hole anyway
    cap = min(window, len(lead) + request.max_tokens + len(tail))
    out = Denoised(hole=torch.empty(0), confidence=torch.empty(0), forced=torch.empty(0))
    confidences = [0.0] * len(hole)
    per_step: list[int] = []
    encode_ms = 0.0
    for step in range(4 * request.max_tokens + 8):  # safety bound; ~final length + expansions
        masked_slots = [i for i, tok in enumerate(hole) if tok == mask_id]
        if not masked_slots:
            break
        if stop.halts(out):
            break
        seq = torch.tensor([lead + hole + tail], device=device)
        positions = torch.arange(seq.shape[1], device=device)[None, :]
        hidden = model.forward(seq, positions)
        hs = len(lead)
        logits = model.output(hidden[:, hs - 1:hs - 1 + len(hole)])  # (1, n, V), shifted
        logits.index_fill_(-1, banned_ids, float("-inf"))
        out.forward_passes += 1
        if step == 0:
            encode_ms = (time.perf_counter() - started) * 1000.0
        if len(lead) + len(hole) + len(tail) >= cap or budget == 0:
            logits[..., expand_id] = float("-inf")
        # DreamOn scores slots by negative entropy and commits the single surest one.
        drawn = sampler.sample(
            logits, temperature=temperature, top_p=request.top_p, generator=generator
        )
        masked = (torch.tensor(hole, device=device) == mask_id)[None, :]
        take = sampler.best_per_row(sampler.neg_entropy(drawn.probs), masked)[0]
        prob = sampler.token_probability(drawn.probs, drawn.tokens)[0]
        slot = int(take.to(torch.int64).argmax())  # batch 1, one commit: the host needs it
        token = int(drawn.tokens[0, slot])
        hole[slot] = token
        confidences[slot] = float(prob[slot])
        if token == expand_id:  # one slot becomes two masks: the hole grows
            hole[slot:slot + 1] = [mask_id, mask_id]
            confidences[slot:slot + 1] = [0.0, 0.0]
            budget -= 1
        elif token in end_ids:
            # Delete: the end token and every still-masked slot right of it (pad_eos_to_right,
            # then removal of EOS in slots that were MASK) disappear; the suffix moves left.
            keep = [i for i, t in enumerate(hole) if i < slot or (i > slot and t != mask_id)]
            hole = [hole[i] for i in keep]
            confidences = [confidences[i] for i in keep]
        per_step.append(1)
    out.hole = torch.tensor([hole], dtype=torch.long)
    out.confidence = torch.tensor([confidences], dtype=torch.float32)
    out.forced = torch.zeros_like(out.hole, dtype=torch.bool)
    out.commits = [per_step]
    out.encode_ms = encode_ms
    out.denoise_ms = (time.perf_counter() - started) * 1000.0 - encode_ms
    return out

