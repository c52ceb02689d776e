"""Checkpoint loading: resolution (folder, HF cache), layouts, strictness and refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.model.weights as weights
from engine.api import EngineError
from engine.model.config import ModelArgs
from engine.model.transformer import Transformer
from engine.model.weights import load_model, resolve_checkpoint, save_checkpoint
from tests.fixtures.checkpoints import make_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    return {
        "dream": make_tiny_checkpoint(root / "dream", "dream", seed=1),
        "dreamon": make_tiny_checkpoint(root / "dreamon", "dreamon", seed=2),
        "open-dcoder": make_tiny_checkpoint(root / "odc", "open-dcoder", seed=3),
        "llada": make_tiny_checkpoint(root / "llada", "llada", seed=4),
        "dream-sharded": make_tiny_checkpoint(root / "dream3", "dream", seed=1, shards=3),
        "llada-sharded": make_tiny_checkpoint(root / "llada2", "llada", seed=4, shards=2),
    }


@pytest.fixture
def copy_of(pristine, tmp_path):
    """A private copy of a pristine checkpoint that a test may damage."""

    def make(name: str) -> Path:
        return Path(shutil.copytree(pristine[name], tmp_path / name))

    return make


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _logits(loaded, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.no_grad():
        return loaded.model.output(loaded.model(x, torch.arange(len(ids))[None]))


# --- what loads ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "family", "variant", "shift", "tied"),
    [
        ("dream", "dream", "dream", True, False),
        ("dreamon", "dream", "dreamon", True, False),
        ("open-dcoder", "dream", "open-dcoder", True, True),
        ("llada", "llada", "llada", False, False),
    ],
)
def test_local_folder_loads_with_family_detected(pristine, name, family, variant, shift, tied):
    loaded = load_model(str(pristine[name]))
    args, tok = loaded.args, loaded.tokenizer
    assert (args.family, args.variant, args.logit_shift, args.tie_embeddings) == (
        family, variant, shift, tied)
    assert loaded.model.args is args
    assert loaded.path == pristine[name].resolve()
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert (tok.mask_id, tok.eos_id, tok.pad_id) == (
        args.mask_token_id, args.eos_token_id, args.pad_token_id)
    assert tok.expand_id == args.expand_token_id
    assert (args.expand_token_id is not None) == (variant == "dreamon")
    assert tok.vocab_size <= args.vocab_size
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    assert torch.isfinite(_logits(loaded, tok.encode("def f():\n\treturn 1\n"))).all()


def test_layout_flags_follow_models_md(pristine):
    dream = load_model(str(pristine["dream"])).args
    odc = load_model(str(pristine["open-dcoder"])).args
    llada = load_model(str(pristine["llada"])).args
    assert (dream.infill_bos, dream.infill_eos, dream.max_context) == (True, True, 2048)
    assert (odc.infill_bos, odc.infill_eos) == (False, False)
    assert (llada.infill_bos, llada.infill_eos, llada.max_context) == (True, False, 4096)


@pytest.mark.parametrize(("single", "sharded"), [("dream", "dream-sharded"),
                                                 ("llada", "llada-sharded")])
def test_sharded_equals_single_file(pristine, single, sharded):
    index = json.loads((pristine[sharded] / weights.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = load_model(str(pristine[single])), load_model(str(pristine[sharded]))
    ids = a.tokenizer.encode("x = [1, 2, 3]")
    assert torch.equal(_logits(a, ids), _logits(b, ids))


def test_published_config_keys(pristine):
    dream = json.loads((pristine["dream"] / "config.json").read_text())
    assert dream["model_type"] == "Dream" and dream["architectures"] == ["DreamModel"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
        assert key in dream
    state = load_file(str(pristine["dream"] / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.bias" in state and "lm_head.weight" in state
    assert state["model.layers.0.self_attn.k_proj.bias"].abs().sum() > 0

    llada = json.loads((pristine["llada"] / "config.json").read_text())
    assert llada["model_type"] == "llada" and llada["block_type"] == "llama"
    for key in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size",
                "embedding_size", "rope_theta", "max_sequence_length", "weight_tying"):
        assert key in llada
    names = load_file(str(pristine["llada"] / "model.safetensors"))
    assert "model.transformer.blocks.1.attn_out.weight" in names
    assert "model.transformer.ff_out.weight" in names

    odc = load_file(str(pristine["open-dcoder"] / "model.safetensors"))
    assert "lm_head.weight" not in odc  # tied: the head is the embedding


def test_save_load_round_trip_is_exact(pristine, tmp_path):
    first = load_model(str(pristine["dreamon"]))
    save_checkpoint(first.model, first.tokenizer, tmp_path / "again", shards=2)
    second = load_model(str(tmp_path / "again"))
    assert second.args == first.args
    for (n1, p1), (n2, p2) in zip(first.model.state_dict().items(),
                                  second.model.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_dtype_override_and_float32_logits(pristine):
    loaded = load_model(str(pristine["dream"]), dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    logits = _logits(loaded, loaded.tokenizer.encode("print(1)"))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_quantize_hook_runs_on_the_loaded_model(pristine):
    seen = []

    def record(model, mode):
        seen.append((mode, next(model.parameters()).device.type))

    load_model(str(pristine["dream"]), quant="int8", quantize_fn=record)
    assert seen == [("int8", "cpu")]


def test_dreamon_recognised_by_tokenizer_expand_token(copy_of):
    path = copy_of("dreamon")
    cfg = json.loads((path / "config.json").read_text())
    expand = cfg.pop("expand_token_id")
    (path / "config.json").write_text(json.dumps(cfg))
    args = load_model(str(path)).args
    assert (args.variant, args.expand_token_id) == ("dreamon", expand)


def test_dreamon_published_quirk_eos_in_delete_token_id(copy_of):
    """DreamOn's HF config has eos_token_id null and the EOS id under delete_token_id."""
    path = copy_of("dreamon")
    eos = json.loads((path / "config.json").read_text())["eos_token_id"]
    _edit_config(path, eos_token_id=None, delete_token_id=eos)
    args = load_model(str(path)).args
    assert (args.variant, args.eos_token_id) == ("dreamon", eos)


def test_remote_code_is_never_executed(copy_of):
    path = copy_of("dream")
    marker = path / "EXECUTED"
    trap = f"open({str(marker)!r}, 'w').write('remote code ran')\n"
    (path / "configuration_dream.py").write_text(trap)
    (path / "modeling_dream.py").write_text(trap)
    assert "auto_map" in json.loads((path / "config.json").read_text())
    load_model(str(path))
    assert not marker.exists()


def test_load_path_never_touches_transformers_or_stdin(pristine):
    """transformers' Auto* classes can prompt on stdin; the load path must not import them."""
    code = (
        "import sys\n"
        "from engine.model.weights import load_model\n"
        f"load_model({str(pristine['dream'])!r})\n"
        "print('transformers' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


# --- Hugging Face cache -------------------------------------------------------------------------


def _fake_hub_cache(root: Path, repo_id: str, source: Path) -> Path:
    """models--org--name/{refs/main, snapshots/<hash>/...} as huggingface_hub lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    return snapshot


def test_repo_id_resolves_through_local_hf_cache(pristine, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "tiny-org/tiny-dream", pristine["dream"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "tiny-org/tiny-dream" is not a local folder
    assert resolve_checkpoint("tiny-org/tiny-dream").resolve() == snapshot.resolve()
    loaded = load_model("tiny-org/tiny-dream")
    assert loaded.args.variant == "dream"


def test_repo_id_absent_from_cache_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EngineError, match="Hugging Face cache") as err:
        resolve_checkpoint("Dream-org/Dream-Coder-v0-Base-7B")
    assert "\n" not in str(err.value)


# --- refusals: one clear EngineError line each ---------------------------------------------------


def _refused(spec, match: str, **kwargs) -> str:
    with pytest.raises(EngineError, match=match) as err:
        load_model(str(spec), **kwargs)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400
    return message


def test_missing_folder_and_empty_spec(tmp_path):
    _refused(tmp_path / "nope", "no such checkpoint folder")
    _refused("", "no model given")
    (tmp_path / "file.txt").write_text("x")
    _refused(tmp_path / "file.txt", "must be a folder")
    _refused(tmp_path, "no config.json")


def test_truncated_shard(copy_of):
    path = copy_of("dream-sharded")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    assert shard.name in _refused(path, "truncated")


def test_truncated_to_nothing_and_garbage_header(copy_of):
    path = copy_of("dream")
    file = path / "model.safetensors"
    file.write_bytes(b"\x01\x02")
    _refused(path, "truncated or corrupt")
    file.write_bytes((20).to_bytes(8, "little") + b"{this is not json!!}" + b"\0" * 64)
    _refused(path, "corrupt safetensors header")


def test_missing_shard(copy_of):
    path = copy_of("llada-sharded")
    victim = sorted(path.glob("model-*.safetensors"))[0]
    victim.unlink()
    assert victim.name in _refused(path, "missing")


def test_index_naming_tensor_absent_from_shard(copy_of):
    path = copy_of("dream-sharded")
    index = json.loads((path / weights.INDEX_FILE).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = index["weight_map"][name]
    (path / weights.INDEX_FILE).write_text(json.dumps(index))
    _refused(path, "listed in the index is absent")


def test_pickle_only_checkpoint(copy_of):
    path = copy_of("dream")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not even a real pickle")
    _refused(path, "pickle-only checkpoint")


@pytest.mark.parametrize("model_type", ["mamba", "qwen3", None])
def test_unknown_family(copy_of, model_type):
    path = copy_of("dream")
    _edit_config(path, model_type=model_type)
    _refused(path, "unsupported model family")


@pytest.mark.parametrize(
    ("name", "option"),
    [
        ("dream", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
        ("dream", {"use_sliding_window": True}),
        ("dream", {"hidden_act": "gelu"}),
        ("dream", {"layer_types": ["full_attention", "sliding_attention"]}),
        ("llada", {"alibi": True}),
        ("llada", {"block_type": "sequential"}),
        ("llada", {"multi_query_attention": True}),
        ("llada", {"include_bias": True}),
        ("llada", {"layer_norm_type": "default"}),
        ("llada", {"activation_type": "gelu"}),
    ],
)
def test_unsupported_option(copy_of, name, option):
    path = copy_of(name)
    _edit_config(path, **option)
    message = _refused(path, "unsupported model option")
    assert next(iter(option)) in message


def test_plain_autoregressive_qwen2_is_refused(copy_of):
    path = copy_of("open-dcoder")
    _edit_config(path, mask_token_id=None)
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("mask_token")
    cfg_file.write_text(json.dumps(cfg))
    _refused(path, "not a masked diffusion model")


def test_open_dcoder_mask_id_from_tokenizer_when_config_lacks_it(copy_of):
    path = copy_of("open-dcoder")
    mask = json.loads((path / "config.json").read_text())["mask_token_id"]
    _edit_config(path, mask_token_id=None)
    assert load_model(str(path)).args.mask_token_id == mask


def test_tokenizer_config_mismatch(copy_of):
    path = copy_of("dream")
    cfg = json.loads((path / "config.json").read_text())
    _edit_config(path, mask_token_id=cfg["bos_token_id"], bos_token_id=cfg["mask_token_id"])
    _refused(path, "disagree on the mask token")
    _edit_config(path, mask_token_id=cfg["mask_token_id"], bos_token_id=cfg["bos_token_id"],
                 eos_token_id=5, pad_token_id=5)  # an ordinary byte token, not an end token
    _refused(path, "disagree on the eos token")


def test_missing_qkv_bias_is_refused_not_dropped(copy_of):
    """models.md trap 5: a non-strict load would silently drop Dream's q/k/v biases."""
    path = copy_of("dream")
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.self_attn.v_proj.bias"]
    save_file(state, str(path / "model.safetensors"))
    assert "v_proj.bias" in _refused(path, "lacks tensor")


def test_unexpected_tensor_is_refused(copy_of):
    path = copy_of("llada")
    state = load_file(str(path / "model.safetensors"))
    state["model.transformer.blocks.0.q_proj.bias"] = torch.zeros(64)
    save_file(state, str(path / "model.safetensors"))
    _refused(path, "unexpected tensor")


def test_shape_mismatch_is_refused(copy_of):
    path = copy_of("dream")
    _edit_config(path, intermediate_size=96)
    _refused(path, "has shape")


def test_bad_config_values(copy_of):
    path = copy_of("dream")
    _edit_config(path, num_key_value_heads=3)
    _refused(path, "not a multiple")
    _edit_config(path, num_key_value_heads="two")
    _refused(path, "bad value")
    (path / "config.json").write_text("{")
    _refused(path, "unreadable JSON")


def test_model_too_big_for_memory(pristine, monkeypatch):
    monkeypatch.setattr(weights, "available_memory", lambda device: 4096)
    message = _refused(pristine["dream"], "needs about")
    assert "available on cpu" in message


def test_quantized_estimate_is_smaller(pristine):
    tensors = weights.checkpoint_tensors(pristine["dream"])
    full = weights.estimate_bytes(tensors, torch.float32, "none")
    assert full == sum(p.numel() * 4 for p in load_model(str(pristine["dream"])).model.parameters())
    assert weights.estimate_bytes(tensors, torch.float32, "int8") < full
    assert weights.estimate_bytes(tensors, torch.float32, "int4") < weights.estimate_bytes(
        tensors, torch.float32, "int8")


def test_unknown_device_is_refused(pristine):
    _refused(pristine["dream"], "device", device="tpu")


def test_from_hf_config_rejects_non_dict():
    with pytest.raises(EngineError):
        ModelArgs.from_hf_config(["not", "a", "dict"])


# --- published configs at full scale (no weights: modules built on the meta device) -------------

DREAM_CODER_CONFIG = {  # keys as models.md §2.1/§2.4 describe Dream-Coder-v0-Base-7B
    "architectures": ["DreamModel"], "model_type": "Dream",
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                 "AutoModel": "modeling_dream.DreamModel"},
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "hidden_act": "silu",
    "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
    "mask_token_id": 151666, "pad_token_id": 151643, "eos_token_id": 151643,
    "bos_token_id": 151665, "torch_dtype": "bfloat16",
}
OPEN_DCODER_CONFIG = {  # models.md §2.2: stock Qwen2 keys, tied, MASK an added token
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    "mask_token_id": 151665, "eos_token_id": 151643, "pad_token_id": 151643,
    "torch_dtype": "bfloat16",
}
LLADA_CONFIG = {  # models.md §2.3/§2.4: LLaDA-8B-Instruct
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
    "alibi": False, "attention_layer_norm": False, "bias_for_layer_norm": False,
    "block_type": "llama", "d_model": 4096, "embedding_size": 126464, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mlp_hidden_size": 12288, "mlp_ratio": 4,
    "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32,
    "max_sequence_length": 4096, "rms_norm_eps": 1e-5, "rope": True,
    "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
    "vocab_size": 126464, "weight_tying": False, "mask_token_id": 126336,
    "eos_token_id": 126081, "pad_token_id": 126081, "init_fn": "mitchell",
    "embedding_dropout": 0.0, "residual_dropout": 0.0, "attention_dropout": 0.0,
}


@pytest.mark.parametrize(
    ("cfg", "expected", "params"),
    [
        (DREAM_CODER_CONFIG, dict(family="dream", variant="dream", head_dim=128, n_kv_heads=4,
                                  logit_shift=True, max_context=2048, qkv_bias=True,
                                  mask_token_id=151666, bos_token_id=151665), 7.6e9),
        (OPEN_DCODER_CONFIG, dict(family="dream", variant="open-dcoder", head_dim=64,
                                  tie_embeddings=True, infill_bos=False, max_context=2048), 0.49e9),
        (LLADA_CONFIG, dict(family="llada", variant="llada", head_dim=128, n_kv_heads=32,
                            ffn_dim=12288, vocab_size=126464, logit_shift=False,
                            max_context=4096, qkv_bias=False, norm_eps=1e-5), 8.0e9),
    ],
)
def test_published_configs_at_full_scale(cfg, expected, params):
    args = ModelArgs.from_hf_config(cfg)
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    with torch.device("meta"):
        model = Transformer(args)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.02, count
    # Every published tensor maps onto a logical native tensor, and those fuse into exactly the
    # model's parameters (q/k/v and gate/up stacked) with the right shapes.
    names = weights.weight_name_map(args)
    shapes = weights.logical_shapes(args)
    assert sorted(names.values()) == sorted(shapes)
    logical = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    fused = weights.fuse_projections(logical, args.n_layers)
    native = model.state_dict()
    assert sorted(fused) == sorted(native)
    assert all(fused[name].shape == native[name].shape for name in native)
