"""Denoising a masked span: the loop, committer, sampler, passes, static batch + graphs, K/V arena,
prefill, context reuse, FIM layout, DreamOn, the batch worker."""
