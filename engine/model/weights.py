"""Checkpoint I/O: resolve a folder or cached repo id, load it strictly, save the published layout.

One build sequence (design/style.md §2.3): config.json -> ModelArgs; tokenizer cross-check; build
on the meta device; read every *.safetensors header (complete, consistent with the index, shapes
as the config implies); map the published weight names onto the native modules;
load_state_dict(strict=True, assign=True); optional quantization; move to the device.

Only safetensors are ever read: pickle checkpoints (*.bin, *.pt) can execute code on load.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.api import EngineError, one_line
from engine.model.config import ModelArgs
from engine.model.tokenizer import Tokenizer
from engine.model.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# Approximate bytes per weight of a quantized linear layer, scales included (engine.md §1).
QUANT_BYTES_PER_WEIGHT = {"int8": 1.0, "fp8": 1.0, "int4": 0.53}


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    args: ModelArgs
    path: Path
    device: torch.device
    dtype: torch.dtype
    kernels: dict[str, str] = field(default_factory=dict)  # quantized layer kind -> its matmul


@dataclass
class TensorEntry:
    """One tensor as its safetensors header describes it."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


# ---------------------------------------------------------------------------------------------
# Published name <-> native name


def weight_name_map(args: ModelArgs) -> dict[str, str]:
    """Published tensor name -> logical native name, for every tensor the checkpoint must hold.

    Logical names keep one matrix per published projection (attention.wq/wk/wv,
    feed_forward.w1/w3); `fuse_projections` then stacks them into the model's fused matrices."""
    names: dict[str, str] = {}
    if args.family == "dream":  # Qwen2ForCausalLM names
        names["model.embed_tokens.weight"] = "tok_embeddings.weight"
        names["model.norm.weight"] = "norm.weight"
        if not args.tie_embeddings:
            names["lm_head.weight"] = "output_proj.weight"
        per_layer = {
            "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
            "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
            "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
            "mlp.down_proj": "feed_forward.w2",
            "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
        }
        prefix = "model.layers.{i}."
    else:  # LLaDA (OLMo-style) names
        names["model.transformer.wte.weight"] = "tok_embeddings.weight"
        names["model.transformer.ln_f.weight"] = "norm.weight"
        if not args.tie_embeddings:
            names["model.transformer.ff_out.weight"] = "output_proj.weight"
        per_layer = {
            "q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv",
            "attn_out": "attention.wo",
            "ff_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "ff_out": "feed_forward.w2",
            "attn_norm": "attention_norm", "ff_norm": "ffn_norm",
        }
        prefix = "model.transformer.blocks.{i}."
    biased = {"attention.wq", "attention.wk", "attention.wv"} if args.qkv_bias else set()
    for i in range(args.n_layers):
        for published, native in per_layer.items():
            pub, nat = prefix.format(i=i) + published, f"layers.{i}.{native}"
            names[f"{pub}.weight"] = f"{nat}.weight"
            if native in biased:
                names[f"{pub}.bias"] = f"{nat}.bias"
    return names


FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
         "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}


def logical_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Shape of every logical native tensor, as the config implies."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, args.dim),
                                          "norm.weight": (args.dim,)}
    if not args.tie_embeddings:
        shapes["output_proj.weight"] = (args.vocab_size, args.dim)
    per_layer = {"attention.wq.weight": (q, args.dim), "attention.wk.weight": (kv, args.dim),
                 "attention.wv.weight": (kv, args.dim), "attention.wo.weight": (args.dim, q),
                 "feed_forward.w1.weight": (args.ffn_dim, args.dim),
                 "feed_forward.w3.weight": (args.ffn_dim, args.dim),
                 "feed_forward.w2.weight": (args.dim, args.ffn_dim),
                 "attention_norm.weight": (args.dim,), "ffn_norm.weight": (args.dim,)}
    if args.qkv_bias:
        per_layer.update({"attention.wq.bias": (q,), "attention.wk.bias": (kv,),
                          "attention.wv.bias": (kv,)})
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def fuse_projections(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Logical state (one matrix per projection) -> the model's fused QKV and gate/up matrices,
    in place; each part is freed as soon as it is stacked."""
    for i in range(n_layers):
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"layers.{i}.{part}.{kind}" for part in parts]
                if names[0] in state:
                    state[f"layers.{i}.{fused}.{kind}"] = torch.cat([state.pop(n) for n in names])
    return state


def split_projections(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """The inverse of fuse_projections, for writing the published layout."""
    sizes = {"attention.wqkv": (args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim,
                                args.n_kv_heads * args.head_dim),
             "feed_forward.w13": (args.ffn_dim, args.ffn_dim)}
    out = dict(state)
    for i in range(args.n_layers):
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                name = f"layers.{i}.{fused}.{kind}"
                if name in out:
                    pieces = out.pop(name).split(sizes[fused])
                    out.update({f"layers.{i}.{p}.{kind}": t for p, t in zip(parts, pieces,
                                                                          strict=True)})
    return out


# Tied checkpoints sometimes still carry a copy of the head; it is redundant, not a mismatch.
REDUNDANT_TIED_HEADS = {"lm_head.weight", "model.transformer.ff_out.weight"}
# Older Qwen2 saves include RoPE's inverse frequencies: derived from the config, not weights.
DERIVED_BUFFER_SUFFIX = "rotary_emb.inv_freq"


# ---------------------------------------------------------------------------------------------
# Resolving a checkpoint


def resolve_checkpoint(spec: str) -> Path:
    """A local folder, or a Hugging Face repo id found in the local cache. Never downloads."""
    if not spec or not str(spec).strip():
        raise EngineError("no model given: pass a checkpoint folder or a Hugging Face repo id")
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise EngineError(f"{local}: a checkpoint must be a folder, not a file")
        return local.resolve()
    if not REPO_ID.match(str(spec)):
        raise EngineError(f"{spec}: no such checkpoint folder")
    cache_dir = hf_cache_dir()
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=str(spec), cache_dir=str(cache_dir),
                                   local_files_only=True)
    except Exception:  # hub raises several not-found types; all mean "not cached"
        raise EngineError(
            f"{spec}: neither a local folder nor a model in the Hugging Face cache ({cache_dir}); "
            f"download it first (hf download {spec})"
        ) from None
    return Path(folder)


def hf_cache_dir() -> Path:
    """The hub cache as the environment says *now* (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


# ---------------------------------------------------------------------------------------------
# Reading


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise EngineError(f"{path}: no config.json (is this a model checkpoint folder?)")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineError(f"{file}: unreadable JSON ({one_line(exc)})") from None
    if not isinstance(cfg, dict):
        raise EngineError(f"{file}: does not hold a JSON object")
    return cfg


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """Parse and validate one file's header: complete, every tensor inside the file."""
    try:
        info = file.stat()
        if not stat.S_ISREG(info.st_mode):  # opening a FIFO would block until a writer comes
            raise EngineError(f"{file}: not a regular file")
        size = info.st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise EngineError(f"{file}: truncated or corrupt safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise EngineError(f"{file}: truncated or corrupt safetensors file (short header)")
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise EngineError(f"{file}: cannot read ({one_line(exc)})") from None
    except ValueError:
        raise EngineError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise EngineError(f"{file}: corrupt safetensors header")
    data_size = size - 8 - header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise EngineError(f"{file}: corrupt safetensors header entry {name!r}") from None
        if end > data_size:
            raise EngineError(
                f"{file}: truncated safetensors file ({size} bytes; tensor {name!r} ends at "
                f"{8 + header_len + end})"
            )
        item = SAFETENSORS_DTYPE_BYTES.get(dtype)
        numel = 1
        for d in shape:
            numel *= d
        if item is None or end - start != numel * item:
            raise EngineError(f"{file}: corrupt safetensors entry {name!r} ({dtype} {shape})")
        entries[name] = TensorEntry(file=file, shape=shape, dtype=dtype)
    return entries


def checkpoint_tensors(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint, from the index (sharded) or the single file."""
    index_file = path / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise EngineError(f"{index_file}: unreadable shard index (no weight_map)") from None
        shard_names = sorted(set(weight_map.values()))
        missing = [s for s in shard_names if not (path / s).is_file()]
        if missing:
            raise EngineError(f"{index_file}: shard {missing[0]} is missing from {path}")
        headers = {s: read_safetensors_header(path / s) for s in shard_names}
        tensors: dict[str, TensorEntry] = {}
        for name, shard in weight_map.items():
            entry = headers[shard].get(name)
            if entry is None:
                raise EngineError(f"{path / shard}: tensor {name!r} listed in the index is absent")
            tensors[name] = entry
        for shard, entries in headers.items():
            extra = sorted(set(entries) - set(weight_map))
            if extra:
                raise EngineError(f"{path / shard}: tensor {extra[0]!r} is not in the index")
        return tensors

    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise EngineError(
                f"{path}: pickle-only checkpoint ({pickles[0]}); only safetensors are loaded "
                "(pickle files can run code): convert it to safetensors first"
            )
        raise EngineError(f"{path}: no *.safetensors weights found")
    if len(files) > 1:
        raise EngineError(f"{path}: several *.safetensors files but no {INDEX_FILE}")
    return read_safetensors_header(files[0])


def estimate_bytes(tensors: dict[str, TensorEntry], dtype: torch.dtype, quant: str) -> int:
    """Resident bytes after loading in `dtype`, linear weights at the quantized width."""
    item = torch.empty((), dtype=dtype).element_size()
    per_weight = QUANT_BYTES_PER_WEIGHT.get(quant)
    total = 0.0
    for name, entry in tensors.items():
        numel = 1
        for d in entry.shape:
            numel *= d
        is_linear = len(entry.shape) == 2 and "embed" not in name and "wte" not in name
        total += numel * (per_weight if (per_weight is not None and is_linear) else item)
    return int(total)


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (None when the platform cannot say)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(needed: int, device: torch.device, what: str) -> None:
    free = available_memory(device)
    if free is not None and needed > free:
        raise EngineError(
            f"{what} needs about {needed / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is "
            f"available on {device}; try a smaller model, a quantized mode or another device"
        )


def load_model(
    spec: str,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    quant: str = "none",
    quantize_fn: Callable[[Transformer, str], object] | None = None,
) -> LoadedModel:
    """Resolve, validate and load a checkpoint; every failure is one EngineError line."""
    path = resolve_checkpoint(spec)
    target = _parse_device(device)
    cfg = read_config(path)
    args = ModelArgs.from_hf_config(_with_tokenizer_mask_id(cfg, path))
    tokenizer = Tokenizer.from_dir(path, args)
    if tokenizer.expand_id is not None and args.family == "dream" and args.expand_token_id is None:
        # DreamOn is recognised by its tokenizer's <|expand|> when the config does not name it.
        args = replace(args, variant="dreamon", expand_token_id=tokenizer.expand_id)
    tensors = checkpoint_tensors(path)
    expected = weight_name_map(args)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(DERIVED_BUFFER_SUFFIX)}
    if args.tie_embeddings:
        tensors = {k: v for k, v in tensors.items()
                   if k not in REDUNDANT_TIED_HEADS or k in expected}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise EngineError(f"{path}: checkpoint lacks tensor {missing[0]!r} "
                          f"({len(missing)} missing for a {args.variant} model)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise EngineError(f"{path}: unexpected tensor {unexpected[0]!r} for a {args.variant} "
                          f"model ({len(unexpected)} unexpected)")

    load_dtype = _parse_dtype(dtype) if dtype is not None else _default_dtype(args, tensors,
                                                                              target)
    # Quantization runs on the CPU copy; without it tensors go straight to the device.
    load_device = target if quant == "none" else torch.device("cpu")
    check_fits(estimate_bytes(tensors, load_dtype, "none"), load_device, f"loading {spec}")
    if load_device != target:
        check_fits(estimate_bytes(tensors, load_dtype, quant), target, f"{spec} ({quant})")

    with torch.device("meta"):
        model = Transformer(args)
    native_shapes = logical_shapes(args)
    for published, native in expected.items():
        if tensors[published].shape != native_shapes[native]:
            raise EngineError(
                f"{path}: tensor {published!r} has shape {list(tensors[published].shape)}, "
                f"config implies {list(native_shapes[native])}"
            )
    state = fuse_projections(_read_tensors(tensors, expected, load_dtype, load_device),
                             args.n_layers)
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the model holds the tensors now; drop the dict before quantizing copies them

    if quant != "none":
        if quantize_fn is None:
            from engine.model.quantize import quantize_model

            def quantize_fn(m, mode):  # fp8 needs the target device to refuse a CPU target
                return quantize_model(m, mode, device=target)
        quantize_fn(model, quant)
    model = model.to(target).eval()
    kernels: dict[str, str] = {}
    # The fast kernels quantize activations (int8, fp8) or run them in bf16 (int4): a float32
    # model asked for exactness, so it keeps the dequantizing layers.
    if quant != "none" and target.type == "cuda" and load_dtype != torch.float32:
        from engine.model.quantize import use_fast_kernels

        kernels = use_fast_kernels(model)
    return LoadedModel(model=model, tokenizer=tokenizer, args=args, path=path, device=target,
                       dtype=load_dtype, kernels=kernels)


def _read_tensors(
    tensors: dict[str, TensorEntry], expected: dict[str, str], dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(tensors[name].file, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as fh:
                for name in names:
                    state[expected[name]] = fh.get_tensor(name).to(dtype)
        except EngineError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise EngineError(f"{file}: cannot read weights ({one_line(exc)})") from None
    return state


def _with_tokenizer_mask_id(cfg: dict, path: Path) -> dict:
    """Open-dCoder ships a stock Qwen2 config; its mask token is named only by the tokenizer."""
    if cfg.get("mask_token_id") is not None or str(cfg.get("model_type", "")).lower() != "qwen2":
        return cfg
    try:
        probe = Tokenizer.from_dir(path)
    except EngineError:
        return cfg  # from_hf_config then refuses with its own message
    return {**cfg, "mask_token_id": probe.mask_id}


def _default_dtype(args: ModelArgs, tensors: dict[str, TensorEntry],
                   target: torch.device) -> torch.dtype:
    """The published dtype, except on CPU: there bf16/fp16 matmuls run several times slower
    than fp32 (measured ~10x on the embedded model), so use fp32 whenever it fits in memory."""
    published = _published_dtype(args)
    if target.type != "cpu" or published == torch.float32:
        return published
    free = available_memory(target)
    needed = estimate_bytes(tensors, torch.float32, "none")
    return torch.float32 if free is None or needed < free // 2 else published


def _published_dtype(args: ModelArgs) -> torch.dtype:
    dtype = DTYPES.get(args.torch_dtype.lower().removeprefix("torch."))
    if dtype is None:
        raise EngineError(f"unsupported torch_dtype {args.torch_dtype!r} in config.json")
    return dtype


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch floating dtype, or its name as a CLI would spell it ("bf16", "float32")."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise EngineError(f"unsupported dtype {dtype} (use float32, bfloat16 or float16)")
        return dtype
    parsed = DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if parsed is None:
        raise EngineError(f"unsupported dtype {dtype!r} (use float32, bfloat16 or float16)")
    return parsed


def _parse_device(device: str) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise EngineError(f"unknown device {device!r} (use cpu or cuda)") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("device cuda requested but CUDA is not available")
    if target.type not in ("cpu", "cuda"):
        raise EngineError(f"unsupported device {device!r} (use cpu or cuda)")
    return target


# ---------------------------------------------------------------------------------------------
# Writing the published layout


def save_checkpoint(
    model: Transformer,
    tokenizer: Tokenizer,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
) -> Path:
    """Write config.json, *.safetensors (published names; sharded + index when shards > 1) and
    the tokenizer files in the layout the family's authors publish."""
    args = model.args
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    native = split_projections(model.state_dict(), args)
    published = {pub: native[nat].detach().to("cpu", dtype).contiguous().clone()
                 for pub, nat in weight_name_map(args).items()}
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    config = dream_config(args, dtype_name) if args.family == "dream" else llada_config(
        args, dtype_name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    shards = max(1, min(int(shards), len(published)))
    if shards == 1:
        save_file(published, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
    else:
        groups: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
        for i, name in enumerate(published):
            groups[i * shards // len(published)][name] = published[name]
        weight_map: dict[str, str] = {}
        for n, group in enumerate(groups, start=1):
            shard = f"model-{n:05d}-of-{shards:05d}.safetensors"
            save_file(group, str(out_dir / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, shard))
        total = sum(t.numel() * t.element_size() for t in published.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    tokenizer.save(out_dir)
    return out_dir


def dream_config(args: ModelArgs, dtype_name: str) -> dict:
    """config.json keys as Dream (model_type Dream) or Open-dCoder (stock qwen2) publish them."""
    cfg: dict = {}
    if args.variant == "open-dcoder":
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    else:
        cfg.update(
            architectures=["DreamModel"],
            model_type="Dream",
            # Published Dream configs point at remote code; the engine never runs it.
            auto_map={"AutoConfig": "configuration_dream.DreamConfig",
                      "AutoModel": "modeling_dream.DreamModel"},
        )
    cfg.update(
        hidden_size=args.dim,
        intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        vocab_size=args.vocab_size,
        hidden_act="silu",
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        rope_scaling=None,
        max_position_embeddings=args.max_context,
        tie_word_embeddings=args.tie_embeddings,
        use_sliding_window=False,
        sliding_window=None,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=False,
        mask_token_id=args.mask_token_id,
        pad_token_id=args.pad_token_id,
        eos_token_id=args.eos_token_id,
        bos_token_id=args.bos_token_id,
        torch_dtype=dtype_name if dtype_name != "float" else "float32",
    )
    if args.head_dim * args.n_heads != args.dim:
        cfg["head_dim"] = args.head_dim
    if args.expand_token_id is not None:
        cfg["expand_token_id"] = args.expand_token_id
    return cfg


def llada_config(args: ModelArgs, dtype_name: str) -> dict:
    """config.json keys as LLaDA publishes them (OLMo style, model_type llada)."""
    if args.head_dim * args.n_heads != args.dim:
        raise EngineError("the LLaDA layout derives head_dim from d_model / n_heads")
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "activation_type": "silu",
        "alibi": False,
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": args.dim,
        "embedding_dropout": 0.0,
        "embedding_size": args.vocab_size,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": args.qkv_bias,
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mlp_hidden_size": args.ffn_dim,
        "mlp_ratio": max(1, args.ffn_dim // args.dim),
        "multi_query_attention": None,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "n_layers": args.n_layers,
        "max_sequence_length": args.max_context,
        "residual_dropout": 0.0,
        "rms_norm_eps": args.norm_eps,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": args.rope_theta,
        "scale_logits": False,
        "use_cache": False,
        "vocab_size": args.vocab_size,
        "weight_tying": args.tie_embeddings,
        "mask_token_id": args.mask_token_id,
        "eos_token_id": args.eos_token_id,
        "pad_token_id": args.pad_token_id,
        "bos_token_id": args.bos_token_id,
        "torch_dtype": dtype_name if dtype_name != "float" else "float32",
    }
