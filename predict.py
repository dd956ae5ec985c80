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
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from diffusion import SAMPLERS
from runtime import dist
from runtime.assemble import load_for_inference
from common.errors import UserError, check_sampling_flags, cli_main, refuse_overwrite, require_at_least_one
from common.io import write_json_atomic, write_text_atomic
from textdata.lm import LengthPrior, canvas


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


def check_args(args, train_max_len: int) -> None:
    require_at_least_one(args, "num_samples", "steps", "batch_size")
    check_sampling_flags(args)
    if args.max_len is not None and not 3 <= args.max_len <= train_max_len:
        raise UserError(f"--max_len must be between 3 and the training --max_len {train_max_len}, got {args.max_len}")
    longest = (args.max_len or train_max_len) - 2
    if args.length is not None and not 1 <= args.length <= longest:
        raise UserError(f"--length must be between 1 and {longest} (--max_len minus [CLS] and [SEP]), got {args.length}")


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
    device = info.device
    log = info.log
    run = load_for_inference(args.checkpoint, device, task="lm")
    cfg, tok, diffusion = run.cfg, run.tokenizer, run.diffusion
    check_args(args, cfg.max_len)
    run.check_steps(args.steps, "--steps")
    max_len = args.max_len or cfg.max_len
    use_cache = not args.no_cache
    if use_cache and not run.denoiser.time_agnostic:
        log(f"predict: the denoiser is conditioned on t ({cfg.time_conditioning}); caching is off")
        use_cache = False

    name = args.name or default_name(args, run)
    out_txt = os.path.join(args.out_dir, f"{name}.txt")
    out_json = os.path.join(args.out_dir, f"{name}.json")
    refuse_overwrite(out_txt, args.overwrite, "generation file")  # every rank checks before any work

    gen_len = torch.Generator().manual_seed(args.seed)
    if args.length is not None:
        lengths = torch.full((args.num_samples,), args.length, dtype=torch.long)
    else:
        lengths = LengthPrior(run.run_info["derived"]["length_counts"]).sample(args.num_samples, max_len - 2, gen_len)
    order = torch.argsort(lengths, stable=True)  # similar lengths share a batch: little padding
    num_batches = -(-args.num_samples // args.batch_size)

    def sample_batch(b: int, gen: torch.Generator):
        """Batch b: ({sample index: text}, network calls, sequence evaluations)."""
        idx = order[b * args.batch_size:(b + 1) * args.batch_size]
        ids, att, noise = (x.to(device) for x in canvas(lengths[idx], tok.cls_token_id, tok.sep_token_id,
                                                         tok.pad_token_id, tok.mask_token_id))
        out = diffusion.sample(run.denoiser, ids, noise, att, args.steps, args.topk, args.top_p,
                               args.temperature, cache=use_cache, generator=gen, sampler=args.sampler)
        texts = {j: " ".join(tok.decode(row[1:int(lengths[j]) + 1], skip_special_tokens=True).split())
                 for j, row in zip(idx.tolist(), out.x0.cpu())}
        return texts, out.network_calls, out.row_evaluations

    def progress(done: int) -> None:
        log(f"predict: {min(done * args.batch_size * info.world_size, args.num_samples)}/{args.num_samples} "
            f"samples, {time.time() - start:.1f}s", flush=True)

    start = time.time()
    results = dist.map_batches(num_batches, sample_batch, info, args.seed, on_batch=progress)
    if results is None:  # not rank 0
        return
    wall = time.time() - start
    texts = {j: text for batch_texts, _, _ in results for j, text in batch_texts.items()}
    calls, rows = sum(r[1] for r in results), sum(r[2] for r in results)
    os.makedirs(args.out_dir, exist_ok=True)
    write_text_atomic(out_txt, "".join(texts[j] + "\n" for j in range(args.num_samples)))
    meta = {"checkpoint": run.ckpt_dir, "samples": out_txt, **{k: v for k, v in vars(args).items() if k != "checkpoint"},
            "cache": use_cache, "wall_seconds": wall, "network_calls": calls, "row_evaluations": rows,
            "sequences_per_second": args.num_samples / wall, "device": str(device), "ranks": info.world_size,
            "threads": torch.get_num_threads()}
    write_json_atomic(out_json, meta)
    print(f"predict: wrote {args.num_samples} samples to {out_txt} in {wall:.1f}s "
          f"({args.num_samples / wall:.2f} sequences/s); {calls} network calls, {rows} sequence evaluations "
          f"({'cache on' if use_cache else 'cache off'}{f', {info.world_size} ranks' if info.enabled else ''})")


if __name__ == "__main__":
    main()
