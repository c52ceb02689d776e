"""Tokenizer: exact round trip of code, special ids by name, cross-checks against config.json."""

from __future__ import annotations

import dataclasses
import json
import unicodedata

import pytest

from engine.api import EngineError
from engine.model.config import ModelArgs
from engine.model.tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer, train_bpe
from tests.fixtures.checkpoints import SAMPLE_CODE, make_tiny_checkpoint

ROUND_TRIP_TEXTS = [
    "",
    " ",
    "def f(x):\n    return x\n",
    "\tif x:\n\t\treturn  y   \n",  # tabs, double spaces, trailing spaces
    "line one\r\nline two\r\n\r\n",  # CRLF and a blank CRLF line
    "lone\rcarriage return",
    "    \n\n\n        \n",  # whitespace-only lines
    "naïve café — “quotes” ∑ ∫ ≤ 日本語のコード 한국어",
    unicodedata.normalize("NFD", "é ñ ü Å"),  # decomposed: must not be normalised away
    "emoji 🎉👩‍💻🇫🇷 and astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "zero\u200bwidth\u00a0nbsp\ufeffbom",
    "x = '\\x00'\0null byte",
    "s = \"<|mask|> <|endoftext|> <|expand|>\"  # special-token text typed in code",
    "a" * 500 + "\n" + "\t" * 50,
]


@pytest.fixture(scope="module", params=["dream", "dreamon", "open-dcoder", "llada"])
def tokenizer(request) -> Tokenizer:
    return train_bpe(SAMPLE_CODE, 300, request.param)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert not set(ids) & tokenizer.special_ids  # no special ids are ever added or matched


def test_merges_were_learned(tokenizer):
    """The trained BPE compresses code: far fewer ids than bytes."""
    text = SAMPLE_CODE[1]
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) * 0.8


def test_special_token_text_in_code_stays_text(tokenizer):
    text = "<|mask|><|endoftext|><|mdm_mask|><|startoftext|>"
    ids = tokenizer.encode(text)
    for special in (tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id):
        assert special not in ids
    assert tokenizer.decode(ids) == text


def test_decode_skips_special_and_out_of_vocab_ids(tokenizer):
    left, right = tokenizer.encode("x = 1"), tokenizer.encode("\ny = 2")
    noise = [tokenizer.mask_id, tokenizer.eos_id, tokenizer.vocab_size + 3]
    if tokenizer.expand_id is not None:
        noise.append(tokenizer.expand_id)
    assert tokenizer.decode(left + noise + right) == "x = 1\ny = 2"


@pytest.mark.parametrize("variant", sorted(SPECIAL_TOKEN_NAMES))
def test_special_ids_come_from_published_names(variant):
    tok = train_bpe(SAMPLE_CODE, 300, variant)
    names = SPECIAL_TOKEN_NAMES[variant]
    assert tok.mask_id == tok.backend.token_to_id(names["mask"])
    assert tok.eos_id == tok.backend.token_to_id(names["eos"])
    assert tok.pad_id == tok.eos_id  # every published family pads with its end token
    assert tok.bos_id == (tok.backend.token_to_id(names["bos"]) if "bos" in names else None)
    assert tok.expand_id == (tok.backend.token_to_id(names["expand"]) if "expand" in names
                             else None)
    assert len({tok.mask_id, tok.eos_id, tok.bos_id, tok.expand_id} - {None}) == len(
        set(names.values())
    )


def test_save_and_reload_keeps_ids_and_encoding(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    for attr in ("mask_id", "eos_id", "pad_id", "bos_id", "expand_id", "special_ids"):
        assert getattr(again, attr) == getattr(tokenizer, attr)
    text = "for i in range(3):\r\n\tprint('🎉', i)\n"
    assert again.encode(text) == tokenizer.encode(text)
    assert again.decode(again.encode(text)) == text
    names = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert names["mask_token"] == tokenizer.token_text(tokenizer.mask_id)


def test_unknown_variant_and_tiny_vocab_are_refused():
    with pytest.raises(EngineError, match="unknown variant"):
        train_bpe(SAMPLE_CODE, 300, "gpt2")
    with pytest.raises(EngineError, match="vocab_size"):
        train_bpe(SAMPLE_CODE, 100, "dream")


# --- cross-checks against config.json ---------------------------------------------------------


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tok") / "dream", "dream")


def _args(path) -> ModelArgs:
    return ModelArgs.from_hf_config(json.loads((path / "config.json").read_text()))


def test_agreeing_config_is_accepted(dream_dir):
    args = _args(dream_dir)
    tok = Tokenizer.from_dir(dream_dir, args)
    assert (tok.mask_id, tok.eos_id, tok.pad_id, tok.bos_id) == (
        args.mask_token_id, args.eos_token_id, args.pad_token_id, args.bos_token_id)


def test_mask_id_disagreeing_with_tokenizer_is_refused(dream_dir):
    args = _args(dream_dir)
    tok = Tokenizer.from_dir(dream_dir)
    bad = dataclasses.replace(args, mask_token_id=tok.bos_id)  # special, but not the mask
    with pytest.raises(EngineError, match="disagree on the mask token"):
        Tokenizer.from_dir(dream_dir, bad)


@pytest.mark.parametrize("role", ["eos", "pad", "bos"])
def test_other_roles_refuse_an_ordinary_token(dream_dir, role):
    args = _args(dream_dir)
    ordinary = Tokenizer.from_dir(dream_dir).encode("x")[0]
    bad = dataclasses.replace(args, **{f"{role}_token_id": ordinary})
    with pytest.raises(EngineError, match=f"disagree on the {role} token.*not a special token"):
        Tokenizer.from_dir(dream_dir, bad)


@pytest.mark.parametrize(("role", "other"), [("bos", "eos_id"), ("eos", "bos_id")])
def test_config_may_pick_another_special_token(dream_dir, role, other):
    """Published configs differ from their tokenizers on BOS (Dream: beginoftext vs endoftext)
    and on EOS (instruct tokenizers name the chat end token): the config's special id wins."""
    args = _args(dream_dir)
    tok = Tokenizer.from_dir(dream_dir)
    chosen = getattr(tok, other)
    changes = {f"{role}_token_id": chosen}
    if role == "eos":
        changes["pad_token_id"] = chosen
    merged = Tokenizer.from_dir(dream_dir, dataclasses.replace(args, **changes))
    assert getattr(merged, f"{role}_id") == chosen


def test_tokenizer_larger_than_embedding_is_refused(dream_dir):
    args = _args(dream_dir)
    tok = Tokenizer.from_dir(dream_dir)
    small = dataclasses.replace(args, vocab_size=tok.vocab_size - 1, bos_token_id=None,
                                mask_token_id=1, eos_token_id=2, pad_token_id=2)
    with pytest.raises(EngineError, match="embedding rows"):
        Tokenizer.from_dir(dream_dir, small)


def test_missing_or_corrupt_tokenizer_file(tmp_path, dream_dir):
    with pytest.raises(EngineError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(EngineError, match="unreadable tokenizer"):
        Tokenizer.from_dir(tmp_path)


def test_named_token_absent_from_vocab_is_refused(tmp_path, dream_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((dream_dir / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"mask_token": "<|nope|>"}))
    with pytest.raises(EngineError, match="not in the vocabulary"):
        Tokenizer.from_dir(tmp_path)
