"""Sampler math on toy logits: per-row counts, thresholds, schedules, determinism."""

from __future__ import annotations

import math

import torch

from engine.denoise import sampler


def _probs_logits(rows: list[list[list[float]]]) -> torch.Tensor:
    """Build logits whose softmax is exactly the given probabilities (B, n, V)."""
    return torch.tensor(rows, dtype=torch.float32).log()


def test_greedy_sample_is_argmax_and_reports_its_probability():
    logits = _probs_logits([[[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]]])
    out = sampler.sample(logits, temperature=0.0)
    assert out.tokens.tolist() == [[1, 0]]
    conf = sampler.token_probability(out.probs, out.tokens)
    assert torch.allclose(conf, torch.tensor([[0.7, 0.5]]))


def test_seeded_sampling_is_deterministic_and_per_row_temperature_keeps_greedy_rows():
    torch.manual_seed(123)
    logits = torch.randn(2, 16, 11)
    temps = torch.tensor([0.0, 1.5])
    a = sampler.sample(logits, temperature=temps, generator=torch.Generator().manual_seed(7))
    b = sampler.sample(logits, temperature=temps, generator=torch.Generator().manual_seed(7))
    c = sampler.sample(logits, temperature=temps, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens[0], logits[0].argmax(-1))  # T = 0 row stays greedy
    assert not torch.equal(a.tokens[1], c.tokens[1])  # the hot row depends on the seed


def test_top_p_keeps_the_smallest_nucleus_and_top_k_the_k_best():
    logits = _probs_logits([[[0.5, 0.3, 0.15, 0.05]]])
    kept = sampler.filter_top_p(logits, 0.7).isfinite()
    assert kept.tolist() == [[[True, True, False, False]]]
    kept_k = sampler.filter_top_k(logits, 3).isfinite()
    assert kept_k.tolist() == [[[True, True, True, False]]]
    # A draw under a tight nucleus only ever returns the top token.
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = sampler.sample(logits, temperature=1.0, top_p=0.4, generator=gen)
        assert out.tokens.item() == 0


def test_confidence_kinds():
    probs = torch.tensor([[[0.6, 0.3, 0.1]]])
    tokens = torch.tensor([[0]])
    s = sampler.Sampled(tokens, probs)
    assert torch.allclose(sampler.token_probability(s.probs, s.tokens), torch.tensor([[0.6]]))
    assert torch.allclose(sampler.top2_margin(s.probs), torch.tensor([[0.3]]))
    expected = sum(p * math.log(p) for p in (0.6, 0.3, 0.1))
    assert torch.allclose(sampler.neg_entropy(s.probs), torch.tensor([[expected]]))


def test_threshold_commits_confident_slots_and_at_least_one_per_row_with_masks():
    conf = torch.tensor([
        [0.95, 0.20, 0.91, 0.99],  # slot 3 is not masked: never taken even though confident
        [0.10, 0.30, 0.20, 0.05],  # nothing over tau: only the best masked slot
        [0.99, 0.99, 0.99, 0.99],  # no masks at all: nothing
    ])
    masked = torch.tensor([
        [True, True, True, False],
        [True, True, True, True],
        [False, False, False, False],
    ])
    take = sampler.transfer_threshold(conf, masked, tau=0.9)
    assert take.tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [False, False, False, False],
    ]


def test_top_k_is_per_row_and_never_overwrites_real_tokens():
    # Row 0 has 4 masks, row 1 only 1: the reference's batch-average k = 2 would make row 1
    # pick a non-mask slot (models.md 6.1). Per-row counts must not.
    conf = torch.tensor([[0.1, 0.9, 0.8, 0.3, 0.5], [0.9, 0.9, 0.2, 0.9, 0.9]])
    masked = torch.tensor([[True, True, True, True, False], [False, False, True, False, False]])
    take = sampler.transfer_top_k(conf, masked, torch.tensor([2, 2]))
    assert take.tolist() == [
        [False, True, True, False, False],
        [False, False, True, False, False],
    ]
    assert not (take & ~masked).any()


def test_top_k_with_alg_temp_samples_exactly_k_masked_slots():
    gen = torch.Generator().manual_seed(3)
    conf = torch.rand(3, 10, generator=gen)
    masked = torch.rand(3, 10, generator=gen) < 0.6
    masked[:, 0] = True
    k = torch.tensor([1, 3, 20])
    take = sampler.transfer_top_k(conf, masked, k, alg_temp=0.5, generator=gen)
    assert not (take & ~masked).any()
    assert take.sum(-1).tolist() == torch.minimum(k, masked.sum(-1)).tolist()


def test_entropy_bounded_adds_lowest_entropy_slots_while_the_sum_fits():
    entropy = torch.tensor([[0.05, 0.6, 0.08, 0.01], [0.9, 0.7, 0.8, 0.95]])
    masked = torch.tensor([[True, True, True, True], [True, False, True, True]])
    take = sampler.transfer_entropy_bounded(-entropy, masked, gamma=0.15)
    # row 0: 0.01 + 0.05 + 0.08 = 0.14 <= 0.15, adding 0.6 would not fit
    # row 1: nothing fits, the single lowest-entropy masked slot (0.8; 0.7 is not masked)
    assert take.tolist() == [[True, False, True, True], [False, False, True, False]]


def test_dream_schedule_counts_are_per_row_clamped_and_finish_at_the_last_step():
    steps = 8
    schedule = sampler.dream_schedule(steps)
    assert schedule[0] == 1.0 and math.isclose(schedule[-1], 1e-3)
    masked = torch.zeros(2, 8, dtype=torch.bool)
    masked[0, :8] = True  # 8 masks
    masked[1, :3] = True  # 3 masks
    conf = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    counts = []
    for step in range(steps):
        k = sampler.dream_transfer_count(masked, schedule, step)
        take = sampler.transfer_top_k(conf, masked, k)
        assert not (take & ~masked).any()
        counts.append(take.sum(-1).tolist())
        masked = masked & ~take
    assert not masked.any()  # the last step reveals whatever is left
    assert [c[1] for c in counts[:3]] == [1, 1, 1]  # floor(3 * r) = 0 is clamped to 1
    assert sum(c[0] for c in counts) == 8 and sum(c[1] for c in counts) == 3
    # with steps = masks the unclamped schedule wastes step 0 (k = 0); clamped it reveals 1
    assert counts[0][0] == 1


def test_dream_reveal_fraction_is_one_at_the_last_step():
    schedule = sampler.dream_schedule(4)
    fractions = [sampler.dream_reveal_fraction(schedule, i) for i in range(4)]
    assert fractions[-1] == 1.0
    assert all(0.0 <= f < 1.0 for f in fractions[:-1])


def test_origin_reveals_only_masked_slots_and_all_at_fraction_one():
    masked = torch.tensor([[True, False, True, True]])
    take = sampler.transfer_origin(masked, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(take, masked)
    none = sampler.transfer_origin(masked, 0.0, torch.Generator().manual_seed(0))
    assert not none.any()


def test_llada_quota_spreads_each_rows_masks_over_the_steps():
    masked = torch.zeros(2, 10, dtype=torch.bool)
    masked[0, :10] = True
    masked[1, :3] = True
    quota = sampler.llada_quota(masked, 4)
    assert quota.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_llada_gumbel_sampling_is_float64_deterministic_and_greedy_at_zero():
    logits = torch.randn(2, 5, 13, generator=torch.Generator().manual_seed(1))
    greedy = sampler.llada_sample(logits, temperature=0.0)
    assert torch.equal(greedy.tokens, logits.argmax(-1))
    a = sampler.llada_sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = sampler.llada_sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.probs.sum(-1), torch.ones(2, 5))
