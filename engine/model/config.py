"""Model hyper-parameters, read from a published config.json (models.md §2.4).

Two config dialects feed one `ModelArgs`: the Dream family writes Qwen2 keys (`hidden_size`,
`num_hidden_layers`, ...), LLaDA writes OLMo keys (`d_model`, `n_layers`, ...). Options the native
model does not implement are refused here, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.api import EngineError

# Dream was trained on 2048-token sequences (README); max_position_embeddings is inherited from
# Qwen2.5 and overstates the usable window.
DREAM_TRAINED_CONTEXT = 2048

DREAM_MODEL_TYPES = {"dream"}
OPEN_DCODER_MODEL_TYPES = {"qwen2"}
LLADA_MODEL_TYPES = {"llada"}


@dataclass
class ModelArgs:
    family: str  # "dream" | "llada"
    variant: str  # "dream" | "dreamon" | "open-dcoder" | "llada" (layout quirks)
    vocab_size: int  # rows of the embedding / lm head
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_embeddings: bool
    logit_shift: bool  # Dream family: slot i is predicted from hidden i-1; LLaDA: from hidden i
    max_context: int  # trained window in tokens (prefix + hole + suffix + specials)
    infill_bos: bool  # layout: [BOS]? + prefix + MASK*L + suffix + [EOS]? (models.md §3)
    infill_eos: bool
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None = None
    expand_token_id: int | None = None  # DreamOn only
    torch_dtype: str = "float32"  # as published

    def __post_init__(self) -> None:
        if self.family not in ("dream", "llada"):
            raise EngineError(f"unknown model family {self.family!r}")
        sizes = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")
        for name in sizes:
            if int(getattr(self, name)) <= 0:
                raise EngineError(f"config value {name}={getattr(self, name)} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise EngineError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise EngineError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id",
                     "expand_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise EngineError(
                    f"config {name}={value} is outside the vocabulary (size {self.vocab_size})"
                )
        if self.mask_token_id in (self.eos_token_id, self.pad_token_id):
            raise EngineError("config mask_token_id must differ from the eos/pad token ids")

    @property
    def kv_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        """Build from a published config.json dict; detects the family from model_type."""
        if not isinstance(cfg, dict):
            raise EngineError("config.json does not hold a JSON object")
        model_type = str(cfg.get("model_type", "")).lower()
        try:
            if model_type in DREAM_MODEL_TYPES or model_type in OPEN_DCODER_MODEL_TYPES:
                return _from_qwen2_keys(cfg, model_type)
            if model_type in LLADA_MODEL_TYPES:
                return _from_olmo_keys(cfg)
        except (TypeError, ValueError) as exc:  # a key with a value of the wrong type
            raise EngineError(f"config.json has a bad value ({exc})") from None
        known = sorted(DREAM_MODEL_TYPES | OPEN_DCODER_MODEL_TYPES | LLADA_MODEL_TYPES)
        raise EngineError(
            f"unsupported model family: model_type={cfg.get('model_type')!r} "
            f"(supported: {', '.join(known)})"
        )


def _require(cfg: dict, key: str, kind: type = int) -> Any:
    if cfg.get(key) is None:
        raise EngineError(f"config.json lacks required key {key!r}")
    try:
        return kind(cfg[key])
    except (TypeError, ValueError):
        raise EngineError(f"config.json key {key!r} has a bad value: {cfg[key]!r}") from None


def _optional_id(cfg: dict, key: str) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, list):  # some configs list several end ids; the first is canonical
        value = value[0] if value else None
    return None if value is None else int(value)


def _refuse(condition: bool, what: str) -> None:
    if condition:
        raise EngineError(f"unsupported model option: {what}")


def _from_qwen2_keys(cfg: dict, model_type: str) -> ModelArgs:
    _refuse(cfg.get("rope_scaling") not in (None, {}), f"rope_scaling={cfg.get('rope_scaling')}")
    rope_params = cfg.get("rope_parameters")  # transformers 5 spelling of rope_scaling
    if isinstance(rope_params, dict):
        _refuse(rope_params.get("rope_type", "default") != "default",
                f"rope_parameters.rope_type={rope_params.get('rope_type')!r}")
    _refuse(bool(cfg.get("use_sliding_window", False)), "use_sliding_window=true")
    _refuse(cfg.get("hidden_act", "silu") != "silu", f"hidden_act={cfg.get('hidden_act')!r}")
    _refuse(bool(cfg.get("use_mrope", False)), "use_mrope=true")
    _refuse(cfg.get("is_causal") is True, "is_causal=true (an autoregressive model)")
    layer_types = cfg.get("layer_types") or []
    _refuse(any(t != "full_attention" for t in layer_types),
            f"layer_types={sorted(set(layer_types))}")

    dim = _require(cfg, "hidden_size")
    n_heads = _require(cfg, "num_attention_heads")
    n_kv_heads = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or dim // n_heads)
    _refuse(head_dim * n_heads != dim and cfg.get("head_dim") is None,
            f"hidden_size={dim} not divisible by num_attention_heads={n_heads}")

    mask_id = _optional_id(cfg, "mask_token_id")
    if mask_id is None:
        raise EngineError(
            f"model_type={model_type!r} config has no mask_token_id: not a masked diffusion model"
        )
    # DreamOn's published config moves EOS into delete_token_id and leaves eos_token_id null.
    eos_id = _optional_id(cfg, "eos_token_id")
    if eos_id is None:
        eos_id = _optional_id(cfg, "delete_token_id")
    if eos_id is None:
        raise EngineError("config.json lacks required key 'eos_token_id'")
    pad_id = _optional_id(cfg, "pad_token_id")
    expand_id = _optional_id(cfg, "expand_token_id")

    if model_type in DREAM_MODEL_TYPES:
        is_dreamon = expand_id is not None or "delete_token_id" in cfg
        variant = "dreamon" if is_dreamon else "dream"
        infill_bos = infill_eos = True
    else:
        variant = "open-dcoder"
        infill_bos = infill_eos = False  # Open-dLLM's infill eval: prefix + masks + suffix only

    max_pos = int(cfg.get("max_position_embeddings") or DREAM_TRAINED_CONTEXT)
    return ModelArgs(
        family="dream",
        variant=variant,
        vocab_size=_require(cfg, "vocab_size"),
        dim=dim,
        n_layers=_require(cfg, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=_require(cfg, "intermediate_size"),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        # Absent theta means transformers' Qwen2Config default, 10000.
        rope_theta=float(cfg.get("rope_theta") or (rope_params or {}).get("rope_theta") or 1e4),
        qkv_bias=True,  # Qwen2 always carries q/k/v biases
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        logit_shift=True,
        max_context=min(max_pos, DREAM_TRAINED_CONTEXT),
        infill_bos=infill_bos,
        infill_eos=infill_eos,
        mask_token_id=mask_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id if pad_id is None else pad_id,
        bos_token_id=_optional_id(cfg, "bos_token_id"),
        expand_token_id=expand_id,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
    )


def _from_olmo_keys(cfg: dict) -> ModelArgs:
    _refuse(bool(cfg.get("alibi", False)), "alibi=true")
    _refuse(cfg.get("block_type", "llama") != "llama", f"block_type={cfg.get('block_type')!r}")
    _refuse(bool(cfg.get("multi_query_attention")), "multi_query_attention=true")
    _refuse(cfg.get("rope", True) is not True, "rope=false")
    _refuse(cfg.get("layer_norm_type", "rms") != "rms",
            f"layer_norm_type={cfg.get('layer_norm_type')!r}")
    _refuse(cfg.get("layer_norm_with_affine", True) is not True, "layer_norm_with_affine=false")
    _refuse(bool(cfg.get("bias_for_layer_norm", False)), "bias_for_layer_norm=true")
    _refuse(cfg.get("activation_type", "silu") != "silu",
            f"activation_type={cfg.get('activation_type')!r}")
    _refuse(bool(cfg.get("include_bias", False)), "include_bias=true")
    _refuse(bool(cfg.get("attention_layer_norm", False)), "attention_layer_norm=true")
    _refuse(cfg.get("clip_qkv") is not None, f"clip_qkv={cfg.get('clip_qkv')}")
    _refuse(bool(cfg.get("scale_logits", False)), "scale_logits=true")
    _refuse(bool(cfg.get("input_emb_norm", False)), "input_emb_norm=true")
    _refuse(cfg.get("rope_scaling") not in (None, {}), f"rope_scaling={cfg.get('rope_scaling')}")

    dim = _require(cfg, "d_model")
    n_heads = _require(cfg, "n_heads")
    n_kv_heads = int(cfg.get("n_kv_heads") or n_heads)
    _refuse(dim % n_heads != 0, f"d_model={dim} not divisible by n_heads={n_heads}")
    ffn_dim = cfg.get("mlp_hidden_size")
    if ffn_dim is None:
        ffn_dim = int(cfg.get("mlp_ratio", 4)) * dim
    vocab_size = _require(cfg, "vocab_size")
    # embedding_size is the row count of wte / the head; it may be padded above vocab_size.
    rows = int(cfg.get("embedding_size") or vocab_size)
    mask_id = _optional_id(cfg, "mask_token_id")
    if mask_id is None:
        raise EngineError("LLaDA config has no mask_token_id")
    eos_id = _optional_id(cfg, "eos_token_id")
    if eos_id is None:
        raise EngineError("config.json lacks required key 'eos_token_id'")
    pad_id = _optional_id(cfg, "pad_token_id")
    return ModelArgs(
        family="llada",
        variant="llada",
        vocab_size=max(rows, vocab_size),
        dim=dim,
        n_layers=_require(cfg, "n_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=dim // n_heads,
        ffn_dim=int(ffn_dim),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        qkv_bias=bool(cfg.get("include_qkv_bias", False)),
        tie_embeddings=bool(cfg.get("weight_tying", False)),
        logit_shift=False,
        max_context=_require(cfg, "max_sequence_length"),
        infill_bos=True,
        infill_eos=False,
        mask_token_id=mask_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id if pad_id is None else pad_id,
        bos_token_id=_optional_id(cfg, "bos_token_id"),
        expand_token_id=None,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
    )
