"""Tokenizer: the checkpoint's tokenizer.json read with `tokenizers`, special ids by name.

Never transformers' Auto* classes: with an `auto_map` in the checkpoint they ask on stdin whether
to run remote code (models.md trap 9), and stdin is the LSP protocol stream. Special token ids
are looked up by the names the checkpoint publishes and cross-checked against config.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from engine.api import EngineError, one_line
from engine.model.config import ModelArgs

# Qwen2's pre-tokenizer split; with byte-level mapping and no normalizer it is lossless.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Published special-token names per variant (models.md §2): role -> token text.
SPECIAL_TOKEN_NAMES: dict[str, dict[str, str]] = {
    "dream": {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "bos": "<|beginoftext|>",
              "mask": "<|mask|>"},
    "dreamon": {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "bos": "<|beginoftext|>",
                "mask": "<|mask|>", "expand": "<|expand|>"},
    "open-dcoder": {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "mask": "<|mask|>"},
    "llada": {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "bos": "<|startoftext|>",
              "mask": "<|mdm_mask|>"},
}
EXPAND_TOKEN_NAME = "<|expand|>"  # DreamOn's expand token, recognised by name only
ROLES = ("mask", "eos", "pad", "bos")


class Tokenizer:
    """Encode/decode code text; named special ids (mask, eos, pad, bos, expand)."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        mask_id: int,
        eos_id: int,
        pad_id: int,
        bos_id: int | None,
        expand_id: int | None,
    ):
        self.backend = backend
        # Special-token text typed in a source file ("<|mask|>" in a comment) must stay text,
        # never turn into a control token.
        self.backend.encode_special_tokens = True
        self.mask_id = mask_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.expand_id = expand_id
        flagged = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        named = {i for i in (mask_id, eos_id, pad_id, bos_id, expand_id) if i is not None}
        self.special_ids: frozenset[int] = frozenset(flagged | named)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: Path, args: ModelArgs | None = None) -> Tokenizer:
        """Read tokenizer.json (+ tokenizer_config.json / special_tokens_map.json) from a
        checkpoint folder; with `args`, refuse ids that disagree with config.json."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise EngineError(f"{path}: no tokenizer.json (only tokenizer.json is supported)")
        try:
            backend = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust parser raises plain Exception subclasses
            raise EngineError(f"{tok_file}: unreadable tokenizer ({one_line(exc)})") from None
        names = _special_token_names(path)
        ids = {role: _id_of(backend, names.get(role), role, tok_file) for role in ROLES}
        expand_id = backend.token_to_id(EXPAND_TOKEN_NAME)

        if args is not None:
            ids, expand_id = _reconcile_with_config(backend, ids, expand_id, args, tok_file)
        if ids["mask"] is None:
            raise EngineError(f"{path}: no mask token named in the tokenizer files or config")
        if ids["eos"] is None:
            raise EngineError(f"{path}: no eos token named in the tokenizer files or config")
        pad_id = ids["eos"] if ids["pad"] is None else ids["pad"]
        if ids["mask"] in (ids["eos"], pad_id):
            raise EngineError(f"{path}: mask token id {ids['mask']} equals the eos/pad id")
        return cls(backend, mask_id=ids["mask"], eos_id=ids["eos"], pad_id=pad_id,
                   bos_id=ids["bos"], expand_id=expand_id)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added; decode(encode(x)) == x for byte-level BPE."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, skipping special tokens and ids beyond the tokenizer (padded head rows)."""
        kept = [i for i in map(int, ids) if i not in self.special_ids and 0 <= i < self.vocab_size]
        return self.backend.decode(kept, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def save(self, out_dir: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out_dir / "tokenizer.json"))
        role_map = {
            "mask_token": self.mask_id,
            "eos_token": self.eos_id,
            "pad_token": self.pad_id,
            "bos_token": self.bos_id,
        }
        names = {k: self.backend.id_to_token(v) for k, v in role_map.items() if v is not None}
        extra = [self.backend.id_to_token(self.expand_id)] if self.expand_id is not None else []
        special_map = dict(names)
        if extra:
            special_map["additional_special_tokens"] = extra
        added = {
            str(i): {"content": tok.content, "special": tok.special, "lstrip": tok.lstrip,
                     "rstrip": tok.rstrip, "normalized": tok.normalized,
                     "single_word": tok.single_word}
            for i, tok in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "added_tokens_decoder": added,
            **special_map,
        }
        _write_json(out_dir / "tokenizer_config.json", config)
        _write_json(out_dir / "special_tokens_map.json", special_map)


def train_bpe(texts: Iterable[str], vocab_size: int, variant: str = "dream") -> Tokenizer:
    """Train a small byte-level BPE (Qwen2-like pre-tokenizer, lossless) and append the variant's
    special tokens by their published names, after the learned vocabulary as in Qwen2."""
    if variant not in SPECIAL_TOKEN_NAMES:
        raise EngineError(f"unknown variant {variant!r} (known: {', '.join(SPECIAL_TOKEN_NAMES)})")
    names = SPECIAL_TOKEN_NAMES[variant]
    specials = list(dict.fromkeys(names.values()))  # eos and pad share a token
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise EngineError(
            f"vocab_size={vocab_size} is below the byte alphabet plus specials "
            f"({len(alphabet) + len(specials)})"
        )
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=alphabet,
        special_tokens=[],
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    backend.add_special_tokens(specials)
    ids = {role: backend.token_to_id(text) for role, text in names.items()}
    return Tokenizer(backend, mask_id=ids["mask"], eos_id=ids["eos"], pad_id=ids["pad"],
                     bos_id=ids.get("bos"), expand_id=ids.get("expand"))


def _special_token_names(path: Path) -> dict[str, str]:
    """Role -> token text from special_tokens_map.json, then tokenizer_config.json."""
    names: dict[str, str] = {}
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):  # later file wins
        file = path / filename
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"{file}: unreadable JSON ({one_line(exc)})") from None
        for role in ROLES:
            value = data.get(f"{role}_token")
            if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
                value = value.get("content")
            if isinstance(value, str) and value:
                names[role] = value
    return names


def _id_of(backend: HFTokenizer, name: str | None, role: str, tok_file: Path) -> int | None:
    if name is None:
        return None
    token_id = backend.token_to_id(name)
    if token_id is None:
        raise EngineError(f"{tok_file}: {role} token {name!r} is named but not in the vocabulary")
    return token_id


def _reconcile_with_config(
    backend: HFTokenizer, ids: dict, expand_id: int | None, args: ModelArgs, tok_file: Path
) -> tuple[dict, int | None]:
    n_tokens = backend.get_vocab_size(with_added_tokens=True)
    if n_tokens > args.vocab_size:
        raise EngineError(
            f"{tok_file}: tokenizer has {n_tokens} tokens but the model has only "
            f"{args.vocab_size} embedding rows"
        )
    config_ids = {"mask": args.mask_token_id, "eos": args.eos_token_id,
                  "pad": args.pad_token_id, "bos": args.bos_token_id}
    merged = dict(ids)
    for role in ROLES:
        cfg_id, tok_id = config_ids[role], ids[role]
        if cfg_id is None:
            continue
        if backend.id_to_token(cfg_id) is None:
            raise EngineError(
                f"config {role}_token_id={cfg_id} is not a token of {tok_file} "
                f"({n_tokens} tokens)"
            )
        # The mask id must match exactly. For the others published checkpoints legitimately
        # differ (Dream configs say BOS 151665 or 151643, models.md §2.4; instruct tokenizers
        # name the chat end token as eos): the config's id wins if it is a special token.
        if role != "mask" and tok_id is not None and tok_id != cfg_id:
            if not _is_special(backend, cfg_id):
                raise EngineError(
                    f"tokenizer and config disagree on the {role} token: config "
                    f"{role}_token_id={cfg_id} ({backend.id_to_token(cfg_id)!r}) is not a special "
                    f"token; tokenizer names {backend.id_to_token(tok_id)!r}={tok_id}"
                )
        elif tok_id is not None and tok_id != cfg_id:
            raise EngineError(
                f"tokenizer and config disagree on the {role} token: tokenizer "
                f"{backend.id_to_token(tok_id)!r}={tok_id}, config {role}_token_id={cfg_id}"
            )
        merged[role] = cfg_id
    if args.expand_token_id is not None:
        if expand_id is not None and expand_id != args.expand_token_id:
            raise EngineError(
                f"tokenizer and config disagree on the expand token: tokenizer {expand_id}, "
                f"config expand_token_id={args.expand_token_id}"
            )
        expand_id = args.expand_token_id
    return merged, expand_id


def _is_special(backend: HFTokenizer, token_id: int) -> bool:
    token = backend.get_added_tokens_decoder().get(token_id)
    return token is not None and token.special


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
