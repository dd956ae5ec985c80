"""--help of every script: the description is the docstring's whole first paragraph, every flag with a default
shows it, and the four "steps" flags each name the other three. The parsers are captured in-process from each
script's main (argparse's parse_args intercepted), so no script runs."""
from __future__ import annotations

import argparse
import importlib

import pytest

SCRIPTS = ("train", "predict", "predict_downstream_condition", "compute_elbo", "compute_metric", "word_freq",
           "bench", "reproduce", "summarise")
STEPS = ("--num_steps", "--max_steps", "--steps", "--eval_steps")


class Captured(Exception):
    pass


def parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    got = {}

    def capture(self, args=None, namespace=None):
        got["parser"] = self
        raise Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(Captured):
        importlib.import_module(script).main([])
    return got["parser"]


def helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each flag's help text as --help prints it (before line wrapping)."""
    fmt = parser._get_formatter()
    return {a.option_strings[-1 if a.option_strings[0].startswith("--no-") else 0]: fmt._expand_help(a)
            for a in parser._actions if a.option_strings and a.dest != "help" and a.help}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_default_is_shown(script, monkeypatch):
    parser = parser_of(script, monkeypatch)
    text = helps(parser)
    for a in parser._actions:
        if not a.option_strings or a.dest == "help" or a.default is None or a.default is argparse.SUPPRESS:
            continue
        if isinstance(a, argparse._StoreTrueAction):  # a switch: off unless given
            continue
        flag = a.option_strings[0]
        assert flag in text and "default" in text[flag].lower(), f"{script} {flag}: {text.get(flag)!r}"
    # the description is a whole paragraph: it ends a sentence
    assert parser.description.rstrip().endswith("."), parser.description


def test_train_help_states_defaults_once_and_its_description_is_whole(monkeypatch):
    text = helps(parser_of("train", monkeypatch))
    assert text["--max_steps"].count("(default: 10000)") == 1 and text["--bf16"].endswith("(default: True)")
    assert parser_of("train", monkeypatch).description.endswith("optionally post-trained (Tang et al.).")


@pytest.mark.parametrize("script, flags", [("train", ("--num_steps", "--max_steps", "--eval_steps")),
                                           ("predict", ("--steps",)), ("predict_downstream_condition", ("--steps",)),
                                           ("compute_elbo", ("--eval_steps",))])
def test_each_steps_flag_names_the_other_three(script, flags, monkeypatch):
    text = helps(parser_of(script, monkeypatch))
    for flag in flags:
        named = {f for f in STEPS if f in text[flag].replace(f"{flag} ", "")}
        assert set(STEPS) - {flag} <= named, f"{script} {flag}: {text[flag]!r}"
    if script.startswith("predict"):  # the gaussian counterpart of --steps says so, and what T is
        assert "--steps" in text["--decode_respacing"] and "--num_steps" in text["--decode_respacing"]
