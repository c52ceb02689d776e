"""Native model vs references no one here wrote: transformers' Qwen2 (Dream layout) and Llama
(LLaDA layout through the OLMo -> Llama name mapping below), both forced non-causal.

models.md trap 4: stock Qwen2/Llama are causal. transformers 5.23's `create_causal_mask`
returns a 4-D `attention_mask` unchanged ("already prepared, or it is custom"), so we pass a 4-D
additive mask (0 = attend, dtype-min = blocked key) and also set `is_causal = False` on every
attention module (the SDPA integration consults it when no mask is given).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from engine.model.transformer import KVSlots, attention_bias, rope_tables
from engine.model.weights import load_model
from tests.fixtures.checkpoints import make_tiny_checkpoint

TOL = 1e-4
BATCH, LENGTH = 3, 14


def _read_published_state(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def _force_non_causal(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False


def qwen2_reference(path: Path, attn: str) -> Qwen2ForCausalLM:
    cfg = json.loads((path / "config.json").read_text())
    config = Qwen2Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
        use_sliding_window=False,
        attn_implementation=attn,
    )
    ref = Qwen2ForCausalLM(config).eval()
    state = _read_published_state(path)
    result = ref.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    # Only a tied head may be absent from the file (transformers ties it to the embedding).
    assert set(result.missing_keys) <= ({"lm_head.weight"} if cfg["tie_word_embeddings"] else set())
    if cfg["tie_word_embeddings"]:
        assert torch.equal(ref.lm_head.weight, ref.model.embed_tokens.weight)
    _force_non_causal(ref)
    return ref


def olmo_to_llama(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaDA's OLMo-style names -> transformers Llama names (written independently of
    engine/model/weights.py so that a mapping bug there cannot hide here)."""
    block = {
        "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
        "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
        "ff_out": "mlp.down_proj",
    }
    out = {}
    for name, tensor in state.items():
        if name == "model.transformer.wte.weight":
            out["model.embed_tokens.weight"] = tensor
        elif name == "model.transformer.ln_f.weight":
            out["model.norm.weight"] = tensor
        elif name == "model.transformer.ff_out.weight":
            out["lm_head.weight"] = tensor
        else:
            parts = name.split(".")  # model.transformer.blocks.{i}.{module}.{weight|bias}
            assert parts[:3] == ["model", "transformer", "blocks"], name
            out[f"model.layers.{parts[3]}.{block[parts[4]]}.{parts[5]}"] = tensor
    return out


def llama_reference(path: Path, attn: str) -> LlamaForCausalLM:
    cfg = json.loads((path / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=cfg["embedding_size"],
        hidden_size=cfg["d_model"],
        intermediate_size=cfg["mlp_hidden_size"],
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_kv_heads"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        max_position_embeddings=cfg["max_sequence_length"],
        tie_word_embeddings=cfg["weight_tying"],
        attention_bias=False,
        mlp_bias=False,
        attn_implementation=attn,
    )
    ref = LlamaForCausalLM(config).eval()
    ref.load_state_dict(olmo_to_llama(_read_published_state(path)), strict=True)
    _force_non_causal(ref)
    return ref


def padded_batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0 full, row 1 right-padded, row 2 left-padded; positions = cumsum(valid) - 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, LENGTH), generator=gen)
    valid = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    valid[1, -5:] = False
    valid[2, :4] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return ids, positions, valid


def additive_mask(valid: torch.Tensor) -> torch.Tensor:
    blocked = torch.finfo(torch.float32).min
    mask = torch.zeros(valid.shape[0], 1, valid.shape[1], valid.shape[1])
    mask = mask.masked_fill(~valid[:, None, None, :], blocked)  # (B, 1, Lq, Lk)
    return mask


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    return {
        "dream": make_tiny_checkpoint(root / "dream", "dream", seed=1),
        "open-dcoder": make_tiny_checkpoint(root / "odc", "open-dcoder", seed=2, n_kv_heads=1),
        "llada": make_tiny_checkpoint(root / "llada", "llada", seed=3, n_kv_heads=4, shards=3),
        "llada-gqa": make_tiny_checkpoint(root / "llada-gqa", "llada", seed=4, n_kv_heads=2),
    }


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["dream", "open-dcoder", "llada", "llada-gqa"])
def test_native_matches_transformers_non_causal(checkpoints, name, attn):
    path = checkpoints[name]
    loaded = load_model(str(path), device="cpu", dtype=torch.float32)
    native = loaded.model
    ref = qwen2_reference(path, attn) if loaded.args.family == "dream" else llama_reference(
        path, attn)
    ids, positions, valid = padded_batch(loaded.tokenizer.vocab_size)

    with torch.no_grad():
        hidden = native(ids, positions, valid)  # (B, L, dim)
        logits = native.output(hidden)  # (B, L, V)
        ref_hidden = ref.model(
            input_ids=ids, position_ids=positions, attention_mask=additive_mask(valid)
        ).last_hidden_state
        ref_logits = ref.lm_head(ref_hidden).float()

    assert logits.dtype == torch.float32
    assert torch.isfinite(hidden).all()
    hidden_diff = (hidden - ref_hidden)[valid].abs().max().item()
    logit_diff = (logits - ref_logits)[valid].abs().max().item()
    assert hidden_diff <= TOL, f"hidden max abs diff {hidden_diff:.2e}"
    assert logit_diff <= TOL, f"logits max abs diff {logit_diff:.2e}"


def test_reference_differs_when_left_causal(checkpoints):
    """Guards the guard: the stock causal reference must NOT match, or the parity test above
    could not catch a model that silently attends causally."""
    path = checkpoints["dream"]
    native = load_model(str(path), dtype=torch.float32).model
    cfg = json.loads((path / "config.json").read_text())
    causal = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"], attn_implementation="sdpa",
    )).eval()
    causal.load_state_dict(_read_published_state(path), strict=True)
    ids = torch.randint(0, 200, (1, LENGTH), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(LENGTH)[None]
    with torch.no_grad():
        ours = native(ids, positions)
        theirs = causal.model(input_ids=ids, position_ids=positions).last_hidden_state
    # Under a causal mask the first position sees only itself: it must differ from ours.
    assert (ours[0, 0] - theirs[0, 0]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["dream", "llada"])
def test_padding_does_not_change_valid_rows(checkpoints, name):
    """A padded row equals the same tokens run alone; an all-invalid row stays finite."""
    model = load_model(str(checkpoints[name]), dtype=torch.float32).model
    ids, positions, valid = padded_batch(200, seed=7)
    valid[0] = False  # a row whose keys are all masked
    with torch.no_grad():
        batched = model(ids, positions, valid)
        assert torch.isfinite(batched).all()
        for row in (1, 2):
            keep = valid[row]
            alone = model(ids[row, keep][None], positions[row, keep][None])
            assert (batched[row, keep] - alone[0]).abs().max() <= 1e-5


def step_at(model, ids, positions, valid, ctx, slots):
    """model.step for the columns `slots` of every row, against copies of the encoded K/V."""
    at = slots.expand(ids.shape[0], -1)  # (B, n)
    kv = KVSlots([k.clone() for k in ctx.k], [v.clone() for v in ctx.v],
                 attention_bias(valid, ctx.k[0].dtype), at)
    rope = rope_tables(positions[:, slots], model.args.head_dim, model.args.rope_theta)
    return model.step(ids[:, slots], rope, kv)


@pytest.mark.parametrize("name", ["dream", "open-dcoder", "llada-gqa"])
def test_encode_then_step_equals_forward(checkpoints, name):
    """Queries recomputed against the cached context (their fresh K/V written over their own
    cached columns) give the full forward's hidden states when nothing has changed."""
    model = load_model(str(checkpoints[name]), dtype=torch.float32).model
    ids, positions, valid = padded_batch(200, seed=11)
    with torch.no_grad():
        full = model(ids, positions, valid)
        hidden, ctx = model.encode(ids, positions, valid)
        assert torch.equal(hidden, full)
        assert len(ctx.k) == model.args.n_layers and len(ctx.v) == model.args.n_layers
        assert ctx.k[0].shape == (BATCH, model.args.n_kv_heads, LENGTH, model.args.head_dim)

        slots = torch.tensor([3, 4, 5, 6])  # the "hole": query rows of every batch row
        q_valid = valid[:, slots]
        stepped = step_at(model, ids, positions, valid, ctx, slots)  # (B, 4, dim)

    assert stepped.shape == (BATCH, len(slots), model.args.dim)
    diff = (stepped - full[:, slots])[q_valid].abs().max().item()
    assert diff <= 1e-5, f"step vs forward max abs diff {diff:.2e}"


def test_step_sees_fresh_query_tokens(checkpoints):
    """After committing new tokens into the hole, step() must reflect them: it equals a full
    forward in which only the hole rows are recomputed against the old context."""
    model = load_model(str(checkpoints["dream"]), dtype=torch.float32).model
    ids, positions, valid = padded_batch(200, seed=13)
    slots = torch.tensor([6, 7])
    with torch.no_grad():
        _, ctx = model.encode(ids, positions, valid)
        new_ids = ids.clone()
        new_ids[:, slots] = (ids[:, slots] + 17) % 200
        stale = step_at(model, ids, positions, valid, ctx, slots)
        fresh = step_at(model, new_ids, positions, valid, ctx, slots)
    assert (stale - fresh).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["dream", "llada-gqa"])
def test_cuda_path_matches_cpu_reference(checkpoints, name):
    """The CUDA attention path (xformers when importable, SDPA otherwise) against the CPU
    transformers reference, fp32, including padded rows and a cached step."""
    path = checkpoints[name]
    loaded = load_model(str(path), device="cuda", dtype=torch.float32)
    ref = qwen2_reference(path, "eager") if loaded.args.family == "dream" else llama_reference(
        path, "eager")
    ids, positions, valid = padded_batch(loaded.tokenizer.vocab_size)
    with torch.no_grad():
        hidden = loaded.model(ids.cuda(), positions.cuda(), valid.cuda()).cpu()
        _, ctx = loaded.model.encode(ids.cuda(), positions.cuda(), valid.cuda())
        slots = torch.tensor([3, 4, 5])
        stepped = step_at(loaded.model, ids.cuda(), positions.cuda(), valid.cuda(), ctx,
                          slots.cuda()).cpu()
        ref_hidden = ref.model(input_ids=ids, position_ids=positions,
                               attention_mask=additive_mask(valid)).last_hidden_state
    assert (hidden - ref_hidden)[valid].abs().max() <= 1e-3
    assert (stepped - ref_hidden[:, slots])[valid[:, slots]].abs().max() <= 1e-3


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_written_by_transformers_loads_and_matches(tmp_path, tied):
    """A checkpoint serialised by transformers' own save_pretrained (5.x config spelling:
    `dtype`, `rope_parameters`, `layer_types`), relabelled as Dream, loads and matches."""
    donor = make_tiny_checkpoint(tmp_path / "donor", "dream")  # only its tokenizer is reused
    donor_cfg = json.loads((donor / "config.json").read_text())
    config = Qwen2Config(
        vocab_size=donor_cfg["vocab_size"], hidden_size=48, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
        rope_theta=123456.0, tie_word_embeddings=tied, attn_implementation="eager",
    )
    torch.manual_seed(21)
    ref = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises biases and norms trivially; make them count
        for name, param in ref.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                param.add_(0.3 * torch.randn_like(param))
    out = tmp_path / "hf"
    ref.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert "rope_parameters" in cfg
    cfg.update(model_type="Dream", architectures=["DreamModel"],
               **{k: donor_cfg[k] for k in ("mask_token_id", "eos_token_id", "pad_token_id",
                                            "bos_token_id")})
    (out / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((donor / name).read_bytes())

    loaded = load_model(str(out), dtype=torch.float32)
    assert loaded.args.rope_theta == 123456.0 and loaded.args.tie_embeddings == tied
    _force_non_causal(ref)
    ids, positions, valid = padded_batch(loaded.tokenizer.vocab_size, seed=3)
    with torch.no_grad():
        ours = loaded.model.output(loaded.model(ids, positions, valid))
        theirs = ref(input_ids=ids, position_ids=positions,
                     attention_mask=additive_mask(valid)).logits.float()
    assert (ours - theirs)[valid].abs().max() <= TOL
