"""Does it learn? Known-answer tasks and the papers' ablations at small scale, with one command.

    bash run.sh reproduce          # parts 1-3, the full run (67 min on 2 CPU cores before MDLM joined part 2)
    bash run.sh reproduce quick    # parts 1-3 and 5 at a smaller scale (7 min before parts 5 and MDLM; with them
                                   # 18+ min measured only on a loaded machine)
    bash run.sh reproduce --parts glm --out results/reproduce-full-<time>   # part 4, beside a finished run
    python reproduce.py --scale quick --out results/reproduce-quick   # run again: finished parts are reused
    python reproduce.py --render results/reproduce-quick   # results.md and the plots again, from results.json

Everything is offline and generated from seeds (textdata/synthetic.py, docs/algorithms.md §5). The parts
(``reproduction/parts.py`` lists them; each is a ``reproduction.spec.Part`` in a module of its own):

1. **Synthetic language** (a sparse Markov chain with a Zipf-like spectrum; exact entropy and
   log-likelihood). An absorbing model from scratch on a word-level tokenizer; its test NLL bound
   (``compute_elbo.py``) beside the true entropy and the exact NLL of the same test sequences; its
   samples (``predict.py``, our sampler and the released one, 8..512 steps) scored exactly
   (``compute_metric.py --mode synthetic``).
2. **DiffusionBERT's ablations** on that language, at equal budgets, over seeds: spindle against
   mutual, TAD against layer-wise and token (prefix) time conditioning, the released loss weighting
   against the ELBO one; and (``bible``) on the Bible LM, pretrained MiniLM against the same network
   from scratch.
3. **Synthetic seq2seq with one right answer** (reverse the source, map each word through a fixed
   bijection): conditional DiffusionBERT and DiffuSeq; DiffuSeq decoded with the full chain,
   uniform_20, adp_20, adp_10 and adp_4, before and after Tang et al.'s post-training, and after its
   control (the same extra steps without the penalty).
4. **The Gaussian LM** (``--parts glm``): Diffusion-LM trained for about part 1's training time, against
   part 1's DiffusionBERT (it reuses that model when run in the same ``--out``, else trains it): its
   test bound, its samples with the full chain and adp_N before and after post-training and the
   control, infilling of held-out sentences with 30% of their words masked (exact-word accuracy and
   the exact NLL of the filled sentence), and ``--length`` control, for both processes.
5. **The sampler study** (``--parts samplers``; in ``quick`` and ``smoke`` by default, smaller): every
   decoding rule (ours, released, confidence with each order, parallel, remask, first_hitting; the
   Gaussian solvers ddpm/ddim/dpm_solver++) at several budgets on part 1's DiffusionBERT, part 4's
   Diffusion-LM and an autoregressive model of the same network trained for the same wall time, scored
   exactly (forbidden fraction, valid-sample NLL, bigram TV, distinct fraction) against network calls
   per sequence; the same rules on part 4's infilling templates and on part 3's reverse-and-map task.
   Its samples are drawn in the reproduce process through ``runtime.api`` (the same strings as
   ``predict.py``), each setting holding one of the ``--jobs`` slots.

Writes ``<out>/results.json`` (every part's results under its key, kept across invocations in the same
folder), ``<out>/results.md`` (rendered from results.json alone: tables, the targets met or not, embedded
plots) and ``<out>/plots/*.png``. Every step runs one of the repository's scripts (logs in ``<out>/logs``);
a step whose output exists is reused, and a training run that was killed resumes from its last
checkpoint, so the same command continues an interrupted reproduction.
"""
from __future__ import annotations

import os
import time

from common.cli import make_parser
from common.errors import UserError, cli_main
from common.io import write_text_atomic
from reproduction import parts as registry
from reproduction.render import page
from reproduction.runner import Runner, make_data
from reproduction.store import open_folder, read_results, stored_results, write_results


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--scale", choices=registry.SCALES, default=None, help="default: full")
    p.add_argument("--out", default=None, help="results folder (default: results/reproduce-<time>); an existing "
                                               "one continues where it stopped")
    defaults = "; ".join(f"{s}: {', '.join(registry.default_parts(s))}" for s in registry.SCALES)
    p.add_argument("--parts", default=None, help="comma-separated, of " + ", ".join(p.key for p in registry.PARTS) +
                   f" (default, by scale: {defaults})")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="runs side by side (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--render", default=None, metavar="OUT",
                   help="run nothing: write OUT/results.md and OUT/plots again from OUT/results.json")
    return p.parse_args(argv)


def chosen_parts(args, scale: str) -> list:
    """The parts to run, in the registry's order: --parts, or the scale's defaults."""
    by_key = {p.key: p for p in registry.PARTS}
    keys = args.parts.split(",") if args.parts else registry.default_parts(scale)
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise UserError(f"--parts takes {', '.join(by_key)}, got {args.parts}")
    return [p for p in registry.PARTS if p.key in keys]


def run_parts(runner: Runner, sc: dict, chosen: list, stored: dict) -> dict:
    """Run the chosen parts side by side (their steps share the --jobs slots, the lowest priority first),
    with any part they need whose results are not stored; their results by key."""
    keys = {p.key for p in chosen}
    needed = {k for p in chosen for k in p.needs if k not in keys and k not in stored}
    todo = [p for p in registry.PARTS if p.key in keys | needed]
    paths = make_data(runner.out, sc)
    try:
        results = runner.parallel([lambda p=p: p.run(runner, paths, sc) for p in todo])
    finally:
        runner.bar.close()
    return {p.key: r for p, r in zip(todo, results)}


def write_page(out: str) -> str:
    """results.md and the plots from ``out``/results.json alone."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        raise UserError(f"--render: no {path}")
    text = page(read_results(path), registry.PARTS, os.path.join(out, "plots"))
    write_text_atomic(os.path.join(out, "results.md"), text)
    return text


def render_only(args) -> None:
    if args.out or args.parts:
        raise UserError("--render re-renders a finished folder: give it alone (not with --out or --parts)")
    write_page(args.render)
    print(f"reproduce: wrote {os.path.join(args.render, 'results.md')}")


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.render:
        return render_only(args)
    scale = args.scale or "full"
    chosen = chosen_parts(args, scale)
    if args.jobs < 1 or args.threads < 1:
        raise UserError("--jobs and --threads must be at least 1")
    sc = registry.scale_settings(scale)
    out = args.out or os.path.join("results", f"reproduce-{scale}-{time.strftime('%Y%m%d-%H%M%S')}")
    open_folder(out, scale, sc)
    print(f"reproduce: scale {scale}, results in {out}", flush=True)
    runner = Runner(os.path.abspath(out), args.jobs, args.threads)
    start = time.time()
    stored = stored_results(out, scale, {p.key for p in registry.PARTS})
    results = stored | run_parts(runner, sc, chosen, stored)
    write_results(out, scale, sc, time.time() - start, results, [p.key for p in registry.PARTS])
    text = write_page(out)
    print("\n" + text)
    print(f"reproduce: wrote {os.path.join(out, 'results.md')} in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
