"""The scripts' argument parsers: ``--help`` starts with the script's docstring summary (its first paragraph,
whole) and ends every flag's help with its default."""
from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already states its default. A switch that is off
    unless given (``store_true``) and a default of None (the help says what happens then) get nothing; the
    description keeps its line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if (not action.option_strings or action.default is None or action.default is argparse.SUPPRESS
                or isinstance(action, argparse._StoreTrueAction) or "default" in help_.lower()):
            return help_
        return f"{help_} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose flags without a help text still show their default (argparse prints no help line,
    and so no default, for a flag without help)."""

    def add_argument(self, *args, **kwargs):
        if not kwargs.get("help") and kwargs.get("default") is not None and kwargs.get("default") is not False:
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument

        def add_argument(*a, **kw):
            if not kw.get("help") and kw.get("default") is not None and kw.get("default") is not False:
                kw["help"] = "(default: %(default)s)"
            return add(*a, **kw)
        group.add_argument = add_argument
        return group


def summary(doc: str | None) -> str | None:
    """A docstring's first paragraph: everything up to its first blank line."""
    if not doc:
        return doc
    return doc.strip().split("\n\n")[0]


def make_parser(doc: str | None, whole_doc: bool = False, **kw) -> argparse.ArgumentParser:
    """The parser of a script whose docstring is ``doc``: its first paragraph (or all of it) as the description."""
    return Parser(description=doc if whole_doc else summary(doc), formatter_class=DefaultsHelpFormatter, **kw)


# The four flags named "steps", each in a few words; every one's help names the other three.
STEP_FLAGS = {
    "num_steps": "T, the diffusion steps of the process, fixed when training",
    "max_steps": "the optimizer steps of a training run",
    "steps": "the sampling iterations of the predict scripts, a grid over 0..T; gaussian: --decode_respacing",
    "eval_steps": "K, the t-grid points of an ELBO estimate, in train.py and compute_elbo.py",
}


def other_steps(flag: str) -> str:
    """The other three "steps" flags, for the help of ``--flag``: ``unlike --a (...), --b (...) and --c (...)``."""
    others = [f"--{k} ({v})" for k, v in STEP_FLAGS.items() if k != flag]
    return "unlike " + ", ".join(others[:-1]) + " and " + others[-1]


def add_rule_options(p: argparse.ArgumentParser) -> None:
    """The decoding rules' own options, shared by predict.py and predict_downstream_condition.py (each checked by
    the rule it belongs to: docs/algorithms.md section 4)."""
    p.add_argument("--order", default=None, metavar="ORDER",
                   help="--sampler confidence: confidence (p_hat of the drawn token; MaskGIT, LLaDA; the default), "
                        "margin (top-1 minus top-2) or entropy (Dream)")
    p.add_argument("--threshold", type=float, default=None,
                   help="--sampler parallel: unmask every position whose p_hat reaches this, in (0, 1] (default 0.9)")
    p.add_argument("--remask", default=None, metavar="SCHEDULE",
                   help="--sampler remask: ReMDM's sigma_t schedule, cap (default), rescale or conf")
    p.add_argument("--eta", type=float, default=None,
                   help="--sampler remask cap/rescale: eta in [0, 1] (default 0.008 for cap, 0.015 for rescale)")
    p.add_argument("--solver", default=None, metavar="NAME",
                   help="gaussian: ddpm (default), ddim or dpm_solver++ (DPM-Solver++(2M)), over the steps of "
                        "--decode_respacing")
