"""The masked-diffusion loss: which slots get masked, the 1/t weight, the logit shift."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.train.objective import masked_diffusion_loss

MASK = 0
VOCAB = 7


class UniformModel(nn.Module):
    """Records what it is fed; predicts a uniform distribution (CE = log V on every target)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, ids, positions, key_valid=None):
        self.seen.append(ids.clone())
        return torch.zeros(*ids.shape, 4) + 0 * self.scale

    def output(self, hidden):
        return torch.zeros(*hidden.shape[:-1], VOCAB) + 0 * self.scale


def _batch(rows: int = 64, length: int = 20):
    ids = torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(rows, length, dtype=torch.bool)
    valid[: rows // 2, length - 5:] = False  # right padding on half the rows
    return ids, valid


@pytest.mark.parametrize("shift", [True, False])
def test_only_maskable_positions_are_masked_and_every_row_gets_one(shift):
    ids, valid = _batch()
    protect = torch.zeros_like(valid)
    protect[:, 3] = True
    model = UniformModel()
    masked_diffusion_loss(model, ids, valid, mask_id=MASK, logit_shift=shift,
                          generator=torch.Generator().manual_seed(1), protect=protect)
    masked = model.seen[0] == MASK
    assert not (masked & ~valid).any()  # padding never
    assert not masked[:, 3].any()  # protected never
    if shift:
        assert not masked[:, 0].any()  # nothing predicts slot 0
    assert masked.any(dim=1).all()


def test_span_rows_mask_one_contiguous_middle():
    ids, valid = _batch(rows=200)
    valid[:] = True
    model = UniformModel()
    masked_diffusion_loss(model, ids, valid, mask_id=MASK, logit_shift=False, span_prob=1.0,
                          generator=torch.Generator().manual_seed(2))
    masked = model.seen[0] == MASK
    assert masked.any(dim=1).all()  # every row has a target
    # With t ~ U(0, 1) inside a random window, masks never scatter over a whole long row:
    # rows whose first and last mask lie far apart are rarer than with i.i.d. masking.
    spread = [(r.nonzero().max() - r.nonzero().min()).item() for r in masked]
    model_iid = UniformModel()
    masked_diffusion_loss(model_iid, ids, valid, mask_id=MASK, logit_shift=False, span_prob=0.0,
                          generator=torch.Generator().manual_seed(2))
    spread_iid = [(r.nonzero().max() - r.nonzero().min()).item() for r in model_iid.seen[0] == MASK]
    assert sum(spread) < sum(spread_iid)


def test_loss_is_weighted_by_one_over_t_and_normalised_per_candidate_token():
    # One row, t forced to 1 (eps close to 1): every candidate is masked with weight ~1, so the
    # loss equals the uniform model's cross-entropy log V.
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    valid = torch.ones(1, 10, dtype=torch.bool)
    loss = masked_diffusion_loss(UniformModel(), ids, valid, mask_id=MASK, logit_shift=False,
                                 span_prob=0.0, eps=0.999999,
                                 generator=torch.Generator().manual_seed(4))
    assert math.isclose(loss.item(), math.log(VOCAB), rel_tol=1e-4)


def test_loss_backpropagates_and_is_deterministic_under_a_generator():
    from engine.model.config import ModelArgs
    from engine.model.transformer import Transformer

    args = ModelArgs(
        family="dream", variant="dream", vocab_size=VOCAB + 3, dim=16, n_layers=1, n_heads=2,
        n_kv_heads=1, head_dim=8, ffn_dim=32, norm_eps=1e-6, rope_theta=1e4, qkv_bias=True,
        tie_embeddings=False, logit_shift=True, max_context=32, infill_bos=True, infill_eos=True,
        mask_token_id=VOCAB, eos_token_id=VOCAB + 1, pad_token_id=VOCAB + 1,
    )
    torch.manual_seed(0)
    model = Transformer(args)
    ids, valid = _batch(rows=4, length=12)

    def loss():
        return masked_diffusion_loss(model, ids, valid, mask_id=VOCAB, logit_shift=True,
                                     generator=torch.Generator().manual_seed(9))

    first = loss()
    assert torch.isfinite(first) and first.item() > 0
    assert torch.equal(first, loss())
    first.backward()
    assert model.tok_embeddings.weight.grad is not None


def test_bad_shapes_are_refused():
    ids, valid = _batch()
    with pytest.raises(ValueError):
        masked_diffusion_loss(UniformModel(), ids, valid[:, :3], mask_id=MASK, logit_shift=True)
