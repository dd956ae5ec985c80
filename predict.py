"""Sampling from a trained lm checkpoint: DiffusionBERT (absorbing), Diffusion-LM (gaussian) or the autoregressive
baseline.

    python predict.py --checkpoint outputs/demo --num_samples 200 --steps 128

Absorbing: each sample's length n is drawn from the training-length histogram stored in the checkpoint
(or fixed with ``--length``), then ``[CLS] [MASK]*n [SEP]`` is denoised over a grid of ``--steps`` timesteps.

    python predict.py --checkpoint outputs/demo --sampler released --steps 256 --topk 30 --temperature 0.1 --length 32

is DiffusionBERT's released sampler with its predict.py settings (T = 512 walked in steps of 2 is the
same t/T grid as 256 steps over any T; 32 wordpieces per sample).

    python predict.py --checkpoint outputs/diffuseq_lm --decode_respacing adp_20

Gaussian: the canvas is the checkpoint's max_len, ``[CLS]`` and then all noised; the model places [SEP] and
the padding (the text ends at the first [SEP] or [PAD]), over the steps of ``--decode_respacing`` (``full``,
the default; ``uniform_N``; ``adp_N``; or a comma-separated list). With ``--length`` the [SEP] and padding
are fixed and the generated positions are words (clamping skips the special tokens).

Autoregressive (``train.py --process autoregressive``): left to right from [CLS] until [SEP] (or the checkpoint's
max_len), with ``--temperature``, ``--top_p`` and ``--topk``; one network call per generated position, on the whole
prefix (no key-value cache). ``--prompt`` works; templates, ``--length``, ``--steps`` and ``--sampler`` do not.

    python predict.py --checkpoint outputs/ar --num_samples 1000 --temperature 1.0 --top_p 0.9

Conditioning, either diffusion process (the given wordpieces stay fixed at every step, as a seq2seq source does):

    python predict.py --checkpoint RUN --template "the [MASK] [MASK] of the lord [MASK]" --num_samples 3
    python predict.py --checkpoint RUN --prompt "in the beginning" --length 12,16
    python predict.py --checkpoint RUN --length 8,12,16       # sample i has the (i mod 3)-th length

* ``--template`` (repeatable) or ``--template_file`` (one per line, blank lines skipped): only the [MASK]
  slots are generated, on ``[CLS] template [SEP]``; ``--num_samples`` is then per template (default 1) and
  the lines are template-major. A template without [MASK] is written back (its tokenisation, decoded) with no
  network call. ``--length`` with templates must equal each template's wordpiece count.
* ``--length N`` above ``--max_len`` - 2 (absorbing): semi-autoregressive, as MDLM's semi-AR sampler. The
  first canvas makes the first W wordpieces (W: the longest training line), then blocks of ``--block_size``
  new ones (default W // 2), each on ``[CLS] <the last W - block_size made> [MASK]*block_size [SEP]``, with
  any ``--sampler`` and ``--prompt`` (at most W - block_size wordpieces, the context a block sees). The json
  and the printed line say how many blocks and how many network evaluations per sequence
  (docs/algorithms.md §1.13):

    python predict.py --checkpoint RUN --length 96 --block_size 10 --num_samples 100

* ``--prompt``: ``[CLS] prompt`` and then generated. ``--length N`` counts every wordpiece between [CLS] and
  [SEP], the prompt's included; without it an absorbing length is drawn from the training lengths longer
  than the prompt, and a gaussian model places [SEP] itself.

Writes one sample per line to ``generation_results/<name>.txt`` (and the settings and timings to
``<name>.json``). While it runs, each finished batch is kept in ``<name>.partial/``: after Ctrl-C (exit 130),
SIGTERM (143) or a crash, the same command (or ``--resume``) continues and writes the same file as an
uninterrupted run; ``--overwrite`` starts again. A second run with the same name is refused while one runs
(``runtime.outputs``).

    torchrun --nproc_per_node 4 predict.py --checkpoint outputs/demo --num_samples 1000

Under torchrun the batches are shared out among the ranks and rank 0 writes them in order; each batch
has its own seed (from ``--seed`` and its index), so the file is the same for any number of ranks.

The sampling is ``runtime.api``'s: in Python, ``load(checkpoint).sample(n, steps=..., seed=...)`` (and
``.infill(templates, ...)``) returns these lines.
"""
from __future__ import annotations

import hashlib
import os
import time

if __name__ == "__main__":  # before torch loads: start again on jemalloc where it is installed (common/heap.py)
    from common.heap import prefer_jemalloc
    prefer_jemalloc()

import torch

from runtime import api, dist, semi_ar
from runtime.assemble import WEIGHTS
from runtime import outputs
from common import heap
from common.cli import add_rule_options, make_parser, other_steps
from common.errors import UserError, check_decoding_flags, cli_main, require_at_least_one

DEFAULT_NUM_SAMPLES = {"sample": 100, "template": 1}  # --num_samples: in all; per template


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (uses its best)")
    p.add_argument("--num_samples", type=int, default=None,
                   help="samples to draw (default 100); with templates, per template (default 1)")
    p.add_argument("--steps", type=int, default=None, help="absorbing: sampling iterations (grid over 0..T; default 128); "
                        f"{other_steps('steps')}")
    p.add_argument("--decode_respacing", default=None,
                   help="gaussian: the sampling steps, a subset of 1..T (train.py's --num_steps): full (all T, the "
                        "default), uniform_N, adp_N (Tang et al.'s adaptive decay) or a comma-separated list; the "
                        "gaussian counterpart of --steps")
    p.add_argument("--weights", default="ema", choices=WEIGHTS,
                   help="gaussian: sample with the EMA of the weights (default, as DiffuSeq) or the raw weights")
    p.add_argument("--sampler", default="ours", metavar="NAME",
                   help="absorbing: ours (default: top-k/top-p/temperature filter p_hat, then the exact reverse step); "
                        "released (DiffusionBERT's sampler: they filter the posterior logits with [MASK] a candidate (its predict.py: --topk 30 --temperature 0.1, 256 steps)); "
                        "confidence (unmask the most confident positions, --order); parallel (Fast-dLLM: every "
                        "position above --threshold); remask (ReMDM, --remask, --eta); first_hitting (exact, the "
                        "network only for rows that change). docs/algorithms.md section 4")
    add_rule_options(p)
    p.add_argument("--topk", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_len", type=int, default=None, help="absorbing: widest canvas in wordpieces incl. [CLS]/[SEP] (default: training --max_len); a longer "
                        "--length is made in blocks of --block_size")
    p.add_argument("--length", default=None,
                   help="every sample has this many wordpieces between [CLS] and [SEP] (the released predict.py: "
                        "32), or a comma-separated list (sample i gets the (i mod k)-th); default: absorbing, drawn "
                        "from the training-length histogram; gaussian, where the model puts [SEP]")
    p.add_argument("--block_size", type=int, default=None,
                   help="absorbing, --length above --max_len minus 2: new wordpieces per semi-autoregressive block "
                        "(default: half the window, the longest training line); docs/algorithms.md section 1.13")
    p.add_argument("--prompt", default=None, help="every sample starts with this text (counted in --length)")
    p.add_argument("--template", action="append", default=None,
                   help="generate only the [MASK]s of this text, e.g. 'the [MASK] [MASK] of the lord [MASK]' "
                        "(repeatable)")
    p.add_argument("--template_file", default=None, help="a file of templates, one per line")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no_cache", action="store_true", help="call the network at every step (no MDLM cache)")
    p.add_argument("--name", default=None, help="output name (default: derived from the checkpoint and flags)")
    p.add_argument("--out_dir", default="generation_results")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: remove an existing result of this name and any batches an interrupted run kept")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same flags (the same command does it too; --resume "
                        "also refuses when there is nothing to continue)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def parse_length(text: str | None):
    """``--length``: None, a count (an int, as always recorded) or a list of counts."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--length must be a number of wordpieces or a comma-separated list of them, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def read_templates(args) -> list[str] | None:
    """The ``--template`` texts, then the lines of ``--template_file`` (blank ones skipped); None if neither."""
    if args.template is None and args.template_file is None:
        return None
    templates = list(args.template or [])
    if args.template_file is not None:
        try:
            with open(args.template_file, encoding="utf-8") as f:
                templates += [line.rstrip("\r\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--template_file {args.template_file}: {e}") from e
        if not templates:
            raise UserError(f"--template_file {args.template_file} holds no template")
    return templates


@cli_main
def main(argv=None):
    args = parse_args(argv)
    heap.fix_mmap_threshold()  # $DLM_MMAP_THRESHOLD, if set: large blocks get their own mappings (common/heap.py)
    check_decoding_flags(args)  # the flags alone, before the checkpoint is loaded
    if args.num_samples is not None:
        require_at_least_one(args, "num_samples")
    with outputs.stop_on_signals("predict"):
        outputs.check_writable(args.out_dir, "--out_dir")  # before any work
        with dist.session(args.device) as info:
            sample_all(args, info)


def sampler_options(args) -> dict:
    """The sampler's options and the gaussian solver, as ``api.Model.decoding`` takes them."""
    return {k: getattr(args, k) for k in ("order", "threshold", "remask", "eta", "solver")}


def short_hash(texts) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:8]


def default_name(args, run, templates) -> str:
    if run.cfg.process == "autoregressive":
        how = f"_ar_topk{args.topk}_p{args.top_p}_temp{args.temperature}"
    elif run.cfg.process == "gaussian":
        how = (f"_respacing{args.decode_respacing or 'full'}{'_raw' if args.weights == 'raw' else ''}"
               f"{'_' + args.solver if args.solver not in (None, 'ddpm') else ''}")
    else:
        options = "".join(f"-{v}" for k, v in sampler_options(args).items() if v is not None)
        how = (f"{'' if args.sampler == 'ours' else '_' + args.sampler + options}_steps{args.steps}_topk{args.topk}"
               f"_p{args.top_p}_temp{args.temperature}")
    length = args.length if not isinstance(args.length, list) else "-".join(map(str, args.length))
    given = (f"_prompt{short_hash([args.prompt])}" if args.prompt is not None else
             f"_templates{short_hash(templates)}" if templates is not None else "")
    blocks = f"_block{args.block_size}" if args.block_size else ""
    return (f"{run.run_name}_{os.path.basename(run.ckpt_dir)}{how}{f'_len{length}' if args.length else ''}{blocks}{given}"
            f"_n{args.num_samples}_seed{args.seed}")


def settings(args, run, info: dist.DistInfo, templates) -> dict:
    """What decides the samples (``runtime.outputs``: an interrupted run continues only with the same)."""
    flags = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "name", "out_dir", "overwrite", "resume",
                                                               "device")}
    return {**flags, "templates": templates, "checkpoint": run.ckpt_dir,
            "checkpoint_files": outputs.checkpoint_files(run.ckpt_dir), "device": info.device.type}


def sample_all(args, info: dist.DistInfo) -> None:
    log = info.log
    args.length = parse_length(args.length)
    templates = read_templates(args)
    if templates is not None and args.prompt is not None:
        raise UserError("--template and --prompt do not go together: a template's start is its prompt "
                        "(write 'in the beginning [MASK] [MASK] ...')")
    if args.num_samples is None:
        args.num_samples = DEFAULT_NUM_SAMPLES["sample" if templates is None else "template"]
    model = api.load(args.checkpoint, info=info, task="lm", weights=args.weights, flags=True)
    run = model.run
    require_at_least_one(args, "num_samples", "batch_size")  # the counts first; the API checks the rest
    if templates is None:
        rows = model.lm_rows(args.num_samples, args.length, args.prompt, args.max_len, args.seed, args.block_size)
    else:
        if args.max_len is not None or args.block_size is not None:
            raise UserError("--max_len and --block_size are for sampling without templates: a template fixes its "
                            "own length, within one canvas")
        rows = model.template_rows(templates, args.num_samples, args.length)
    decoding = model.decoding(args.steps, args.decode_respacing, args.sampler, args.topk, args.top_p,
                              args.temperature, not args.no_cache, **sampler_options(args))
    args.steps = decoding.steps  # absorbing: the default 128, recorded in the json
    for note in decoding.notes:
        log(f"predict: {note}")

    name = args.name or default_name(args, run, templates)
    out_txt = os.path.join(args.out_dir, f"{name}.txt")
    out_json = os.path.join(args.out_dir, f"{name}.json")
    output = outputs.open_output([out_txt, out_json], os.path.join(args.out_dir, f"{name}.partial"),
                                 settings(args, run, info, templates), resume=args.resume, overwrite=args.overwrite,
                                 info=info, what="generation file")
    if output is None:  # --resume found it finished
        return

    def progress(done: int) -> None:
        log(f"predict: {min(done * args.batch_size * info.world_size, len(rows))}/{len(rows)} "
            f"samples, {time.time() - start:.1f}s", flush=True)

    start = time.time()
    out = model.generate(rows, decoding, args.seed, args.batch_size, on_batch=progress, store=output.store())
    if out is None:  # not rank 0
        return output.finish(info)
    wall = time.time() - start
    calls, evaluations = out.network_calls, out.row_evaluations
    output.write_text(out_txt, "".join(text + "\n" for text in out.texts))
    meta = {"checkpoint": run.ckpt_dir, "samples": out_txt, **{k: v for k, v in vars(args).items() if k != "checkpoint"},
            "cache": decoding.use_cache, "wall_seconds": wall, "network_calls": calls,
            "row_evaluations": evaluations, "calls_per_sequence": evaluations / len(rows),
            "sequences_per_second": len(rows) / wall, "device": str(info.device),
            "ranks": info.world_size, "threads": torch.get_num_threads(), "process": run.cfg.process,
            "templates": templates, "resumed_batches": output.resumed, **decoding.report,
            **semi_ar.report(rows, out.blocks, out.row_evaluations)}
    output.write_json(out_json, meta)
    output.finish(info)
    ranks = f", {info.world_size} ranks" if info.enabled else ""
    cache = decoding.summary
    print(f"predict: wrote {len(rows)} samples to {out_txt} in {wall:.1f}s "
          f"({len(rows) / wall:.2f} sequences/s); {calls} network calls, {evaluations} sequence evaluations "
          f"({cache}{ranks}{f'; {output.resumed} batches kept from the interrupted run' if output.resumed else ''})"
          f"{semi_ar_line(meta)}")


def semi_ar_line(meta: dict) -> str:
    if "semi_ar" not in meta:
        return ""
    s = meta["semi_ar"]
    return (f"; semi-autoregressive: {s['blocks_per_sequence']:g} blocks per sequence (window {s['window']}, "
            f"blocks of {s['block_size']}), {s['row_evaluations_per_sequence']:g} network evaluations per sequence")


if __name__ == "__main__":
    main()
