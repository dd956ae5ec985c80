"""Print what a run learned: its headline figures beside baselines a newcomer can judge, and whether it beat them.

    # LM: the perplexity bound beside the untrained network and a unigram model (compute_elbo.py --baselines)
    python summarise.py --elbo generation_results/demo.elbo.json

    # seq2seq: BLEU of the MBR output beside copying the source (compute_metric.py --mode seq2seq or compare)
    python summarise.py --bleu generation_results/cond/metrics_mbr.json --copy generation_results/cond/metrics_copy_source.json

Reads the JSON files the other scripts wrote and prints a few lines (``evaluation.baselines``); it writes
nothing. ``run.sh``, ``run_condition.sh`` and ``scripts/diffuseq.sh`` end with it.
"""
from __future__ import annotations

import json
import os

from common.cli import make_parser
from common.errors import UserError, cli_main
from evaluation.baselines import lm_lines, seq2seq_lines


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--elbo", help="a compute_elbo.py --baselines result")
    p.add_argument("--bleu", help="compute_metric.py's JSON for the model's output: --mode seq2seq (one output) or "
                                  "--mode compare (one per setting)")
    p.add_argument("--copy", help="compute_metric.py --mode seq2seq's JSON for copy_source.jsonl")
    args = p.parse_args(argv)
    if not (args.elbo or args.bleu):
        p.error("give --elbo, or --bleu with --copy")
    if bool(args.bleu) != bool(args.copy):
        p.error("--bleu and --copy go together")
    return args


def read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from e


@cli_main
def main(argv=None):
    args = parse_args(argv)
    lines = []
    if args.elbo:
        res = read_json(args.elbo, "ELBO result")
        if "baselines" not in res:
            raise UserError(f"{args.elbo} has no baselines; compute it with compute_elbo.py --baselines")
        lines += lm_lines(res)
    if args.bleu:
        try:
            lines += seq2seq_lines(read_json(args.bleu, "metrics file"), read_json(args.copy, "copy-baseline metrics"))
        except (KeyError, ValueError) as e:
            raise UserError(f"{args.bleu} and {args.copy} are not compute_metric.py seq2seq/compare results of the "
                            f"same sources: {e}") from e
    print("\n".join(lines))


if __name__ == "__main__":
    main()
