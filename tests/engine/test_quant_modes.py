"""Every command line offers exactly the quant modes of the typed boundary (engine.api.QuantMode),
and every check of a mode uses that one list."""

from __future__ import annotations

import argparse
from typing import get_args

import pytest

from engine.__main__ import build_parser
from engine.api import EngineError, QuantMode
from engine.eval.harness import parse_args
from engine.model.quantize import QUANT_MODES, quantize_model


def quant_choices(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    """--quant's choices in this parser and each of its subcommands, by command."""
    found = {}
    for action in parser._actions:
        if "--quant" in action.option_strings and action.choices is not None:  # bench: a list
            found[parser.prog] = tuple(action.choices)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update(quant_choices(sub))
    return found


def test_every_engine_command_offers_the_boundarys_modes():
    choices = quant_choices(build_parser())
    assert {"complete", "serve", "cluster"} <= {prog.split()[-1] for prog in choices}, choices
    assert set(choices.values()) == {get_args(QuantMode)}


def test_the_eval_command_offers_them_and_rejects_others(capsys):
    assert parse_args(["--quant", "fp8"]).quant == "fp8"
    with pytest.raises(SystemExit):
        parse_args(["--quant", "int3"])
    assert "choose from 'none', 'int8', 'int4', 'fp8'" in capsys.readouterr().err


def test_quantize_checks_against_the_same_list():
    assert QUANT_MODES == get_args(QuantMode)
    with pytest.raises(EngineError, match="none, int8, int4, fp8"):
        quantize_model(None, "int3")
