"""Unconditional sampling from a trained DiffusionBERT checkpoint.

    python predict.py --checkpoint outputs/demo --num_samples 200 --steps 128

Each sample's length n is drawn from the training-length histogram stored in the checkpoint (or fixed
with ``--length``), then ``[CLS] [MASK]*n [SEP]`` is denoised over a grid of ``--steps`` timesteps.

    python predict.py --checkpoint outputs/demo --sampler released --steps 256 --topk 30 --temperature 0.1 --length 32

is DiffusionBERT's released sampler with its predict.py settings (T = 512 walked in steps of 2 is the
same t/T grid as 256 steps over any T; 32 wordpieces per sample). Writes one sample per
line to ``generation_results/<name>.txt`` (and the settings and timings to ``<name>.json``).

    torchrun --nproc_per_node 4 predict.py --checkpoint outputs/demo --num_samples 1000

Under torchrun the batches are shared out among the ranks and rank 0 writes them in order; each batch
has its own seed (from ``--seed`` and its index), so the file is the same for any number of ranks.

The sampling is ``runtime.api``'s: in Python, ``load(checkpoint).sample(n, steps=..., seed=...)`` returns
these lines.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from diffusion import SAMPLERS
from runtime import api, dist
from common.errors import cli_main, refuse_overwrite, require_at_least_one
from common.io import write_json_atomic, write_text_atomic


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (uses its best)")
    p.add_argument("--num_samples", type=int, default=100)
    p.add_argument("--steps", type=int, default=128, help="sampling iterations (grid over 0..T)")
    p.add_argument("--sampler", default="ours", choices=SAMPLERS,
                   help="ours: top-k/top-p/temperature filter p_hat, then the exact reverse step; released: "
                        "DiffusionBERT's sampler, they filter the posterior logits with [MASK] a candidate "
                        "(its predict.py: --topk 30 --temperature 0.1, 256 steps)")
    p.add_argument("--topk", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_len", type=int, default=None, help="longest sample in wordpieces incl. [CLS]/[SEP] (default: training --max_len)")
    p.add_argument("--length", type=int, default=None,
                   help="every sample has this many wordpieces between [CLS] and [SEP] (the released predict.py: "
                        "32); default: drawn from the training-length histogram")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no_cache", action="store_true", help="call the network at every step (no MDLM cache)")
    p.add_argument("--name", default=None, help="output name (default: derived from the checkpoint and flags)")
    p.add_argument("--out_dir", default="generation_results")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    with dist.session(args.device) as info:
        sample_all(args, info)


def default_name(args, run) -> str:
    return (f"{run.run_name}_{os.path.basename(run.ckpt_dir)}"
            f"{'_released' if args.sampler == 'released' else ''}_steps{args.steps}_topk{args.topk}_p{args.top_p}"
            f"_temp{args.temperature}{f'_len{args.length}' if args.length else ''}"
            f"_n{args.num_samples}_seed{args.seed}")


def sample_all(args, info: dist.DistInfo) -> None:
    log = info.log
    model = api.load(args.checkpoint, info=info, task="lm", flags=True)
    run = model.run
    require_at_least_one(args, "num_samples", "steps", "batch_size")  # the counts first; the API checks the rest
    sampling = model.sampling(args.steps, args.sampler, args.topk, args.top_p, args.temperature, not args.no_cache,
                              args.length, args.max_len)
    if not args.no_cache and not sampling.use_cache:
        log(f"predict: the denoiser is conditioned on t ({run.cfg.time_conditioning}); caching is off")

    name = args.name or default_name(args, run)
    out_txt = os.path.join(args.out_dir, f"{name}.txt")
    out_json = os.path.join(args.out_dir, f"{name}.json")
    refuse_overwrite(out_txt, args.overwrite, "generation file")  # every rank checks before any work

    def progress(done: int) -> None:
        log(f"predict: {min(done * args.batch_size * info.world_size, args.num_samples)}/{args.num_samples} "
            f"samples, {time.time() - start:.1f}s", flush=True)

    start = time.time()
    out = model.sample_batches(args.num_samples, sampling, args.seed, args.batch_size, on_batch=progress)
    if out is None:  # not rank 0
        return
    wall = time.time() - start
    calls, rows = out.network_calls, out.row_evaluations
    os.makedirs(args.out_dir, exist_ok=True)
    write_text_atomic(out_txt, "".join(text + "\n" for text in out.texts))
    meta = {"checkpoint": run.ckpt_dir, "samples": out_txt, **{k: v for k, v in vars(args).items() if k != "checkpoint"},
            "cache": sampling.use_cache, "wall_seconds": wall, "network_calls": calls, "row_evaluations": rows,
            "sequences_per_second": args.num_samples / wall, "device": str(info.device), "ranks": info.world_size,
            "threads": torch.get_num_threads()}
    write_json_atomic(out_json, meta)
    ranks = f", {info.world_size} ranks" if info.enabled else ""
    print(f"predict: wrote {args.num_samples} samples to {out_txt} in {wall:.1f}s "
          f"({args.num_samples / wall:.2f} sequences/s); {calls} network calls, {rows} sequence evaluations "
          f"({'cache on' if sampling.use_cache else 'cache off'}{ranks})")


if __name__ == "__main__":
    main()
