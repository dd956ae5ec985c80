"""Perplexity bound of a DiffusionBERT checkpoint from its negative ELBO.

    python compute_elbo.py --checkpoint outputs/demo --eval_steps 128 --num_examples 1000

On a seeded subset of the checkpoint's dataset split, computes for each example
``NLL <= -log p(n) + sum_k KL_k`` (the length term plus the K-step diffusion bound; docs/algorithms.md
§1.9) and reports ``exp(total / wordpieces)`` (per token, [CLS]/[SEP]/[PAD] excluded) and
``exp(total / whitespace words)`` (per word, DiffusionBERT's LM1B convention). Same seed, same number,
also under ``torchrun --nproc_per_node N`` (batches are shared out among the ranks, each batch has its
own seed, and rank 0 adds the per-batch sums in batch order).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from runtime.assemble import load_for_inference
from runtime import dist
from common.errors import UserError, cli_main, refuse_overwrite
from common.io import write_json_atomic
from common.stats import ratio_standard_error
from textdata import lm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (uses its best)")
    p.add_argument("--split", default="test", choices=lm.SPLITS)
    p.add_argument("--num_examples", type=int, default=1000, help="size of the seeded subset (0: the whole split)")
    p.add_argument("--eval_steps", type=int, default=128, help="K, the grid size of the bound")
    p.add_argument("--monte_carlo", action="store_true", help="one random grid step per example (K times cheaper, noisier)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="JSON output (default: generation_results/elbo_<run>_<checkpoint>_<split>_K<k>_n<n>_seed<s>.json)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.num_examples < 0 or args.batch_size < 1 or args.eval_steps < 1:
        raise UserError("need --num_examples >= 0, --batch_size >= 1 and --eval_steps >= 1")
    with dist.session(args.device) as info:
        evaluate(args, info)


def evaluate(args, info: dist.DistInfo) -> None:
    device = info.device
    log = info.log
    run = load_for_inference(args.checkpoint, device, task="lm")
    cfg, tok, diffusion = run.cfg, run.tokenizer, run.diffusion
    run.check_steps(args.eval_steps, "--eval_steps")
    out = args.out or os.path.join("generation_results", f"elbo_{run.run_name}_{os.path.basename(run.ckpt_dir)}_{args.split}"
                                   f"_K{args.eval_steps}_n{args.num_examples}_seed{args.seed}"
                                   f"{'_mc' if args.monte_carlo else ''}.json")
    refuse_overwrite(out, args.overwrite, "ELBO result")

    with dist.main_first(info):  # rank 0 builds the datasets cache
        raw = lm.load_text_splits(cfg.dataset, cfg.data_files, cfg.data_dir, log=log, skip_bad_lines=cfg.skip_bad_lines)
        data = lm.tokenize_splits({args.split: raw[args.split]}, tok, cfg.max_len, log=log)[args.split]
    if args.num_examples and args.num_examples < len(data):
        data = data.shuffle(seed=args.seed).select(range(args.num_examples))
    prior = lm.LengthPrior(run.run_info["derived"]["length_counts"])
    start = time.time()
    collate = lm.collator_for(tok)
    num_batches = -(-len(data) // args.batch_size)

    def batch_sums(b: int, gen: torch.Generator):
        """Batch b: (diffusion NLL, length NLL, tokens, words, per-example (NLL bound, tokens) pairs)."""
        batch = collate([data[j] for j in range(b * args.batch_size, min((b + 1) * args.batch_size, len(data)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        nelbo = diffusion.nelbo(run.denoiser, batch["input_ids"], batch["noise_mask"], batch["attention_mask"],
                                args.eval_steps, monte_carlo=args.monte_carlo, generator=gen)
        n = batch["noise_mask"].sum(-1)
        length_nll = -prior.log_prob(n.cpu()).double()
        per_example = list(zip((nelbo.double().cpu() + length_nll).tolist(), n.tolist()))
        return (float(nelbo.double().sum()), float(length_nll.sum()), int(n.sum()),
                int(batch["n_words"].sum()), per_example)

    def progress(done: int) -> None:
        log(f"elbo: batch {min(done * info.world_size, num_batches)}/{num_batches}, {time.time() - start:.0f}s",
            flush=True)

    sums = dist.map_batches(num_batches, batch_sums, info, args.seed, on_batch=progress)
    if sums is None:  # not rank 0
        return
    tot = {"diffusion_nll": 0.0, "length_nll": 0.0, "tokens": 0, "words": 0}
    for b in range(num_batches):  # a fixed order of addition: the same float for any number of ranks
        for key, v in zip(tot, sums[b]):
            tot[key] += v
    nll = tot["diffusion_nll"] + tot["length_nll"]
    pairs = [p for b in range(num_batches) for p in sums[b][4]]
    se = ratio_standard_error([p[0] for p in pairs], [p[1] for p in pairs])
    res = {"checkpoint": run.ckpt_dir, "split": args.split, "num_examples": len(data), "eval_steps": args.eval_steps,
           "monte_carlo": args.monte_carlo, "seed": args.seed, **tot, "nll_bound": nll,
           "nelbo_per_token": nll / tot["tokens"], "nelbo_per_token_se": se, "ppl_token": math.exp(nll / tot["tokens"]),
           "ppl_word": math.exp(nll / tot["words"]),
           "ppl_token_diffusion_only": math.exp(tot["diffusion_nll"] / tot["tokens"]),
           "seconds": time.time() - start, "ranks": info.world_size,
           "convention": "NLL bound = -log p(n) + K-step diffusion NELBO; per token excludes [CLS]/[SEP]/[PAD]; "
                         "per word divides by whitespace words of the text; nelbo_per_token_se is the standard error "
                         "of the ratio of means over examples (delta method): the Monte Carlo error of the x_t "
                         "draws and the sampling error of the examples together"}
    write_json_atomic(out, res)
    print(f"elbo: {len(data)} {args.split} examples, K={args.eval_steps}: NELBO {nll / tot['tokens']:.4f} "
          f"(+- {se:.4f}) nats/token; "
          f"PPL <= {res['ppl_token']:.2f} per wordpiece, <= {res['ppl_word']:.2f} per word "
          f"(length term {tot['length_nll'] / tot['tokens']:.4f} nats/token); wrote {out} in {res['seconds']:.0f}s")

if __name__ == "__main__":
    main()
