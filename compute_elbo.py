"""Perplexity bound of a language-model checkpoint (DiffusionBERT, or Gaussian diffusion on embeddings)
from its negative ELBO.

    python compute_elbo.py --checkpoint outputs/demo --eval_steps 128 --num_examples 1000

On a seeded subset of the checkpoint's dataset split, computes for each example an upper bound on its NLL
and reports ``exp(total / wordpieces)`` (per token, [CLS]/[SEP]/[PAD] excluded) and
``exp(total / whitespace words)`` (per word, DiffusionBERT's LM1B convention). The bound:

* absorbing: ``NLL <= -log p(n) + sum_k KL_k``, the length term plus the diffusion bound on a grid of K =
  ``--eval_steps`` steps (docs/algorithms.md §1.9);
* absorbing trained with ``--objective mdlm``: ``NLL <= -log p(n) + NELBO``, the length term plus the
  continuous-time bound (docs/algorithms.md §1.14), a Monte Carlo estimate from K = ``--eval_steps`` stratified
  draws of t per example (K network calls per batch, one more for the log-linear schedule's jump term); the
  output says ``"time": "continuous"`` and ``t_draws``;
* gaussian: the NELBO of the whole canvas after [CLS] (``GaussianDiffusion.nelbo``, docs/algorithms.md
  §2.9), with the sum over t estimated from K = ``--eval_steps`` stratified draws (K + 1 network calls per
  batch; K >= T - 1 computes every term). No length term: the model generates [SEP] and the padding;
* autoregressive (``train.py --process autoregressive``): no bound but the exact NLL, ``sum_j -log p(x_j | x_<j)``
  over the wordpieces and the [SEP] (docs/algorithms.md §6), one network call per batch; ``--eval_steps`` is
  accepted and changes nothing, the output says ``"bound": false, "estimator": "exact"``. Same seed, same number,
also under ``torchrun --nproc_per_node N`` (batches are shared out among the ranks, each batch has its
own seed, and rank 0 adds the per-batch sums in batch order).

``--baselines`` puts the number on a scale: on the same examples it also computes the same bound (same
grid, same seed: only the weights differ) of the untrained network, the run's step-0 weights rebuilt from
its config and seed (``runtime.assemble.initial_network``), and the perplexity of an add-one unigram model
of the training split with the same length term (``evaluation.baselines``); it prints which of them the
trained model beats.

Each finished batch is kept in ``<out>.partial/`` while it runs: after Ctrl-C (exit 130), SIGTERM (143) or a
crash, the same command (or ``--resume``) continues and writes the same numbers as an uninterrupted run;
``--overwrite`` starts again (``runtime.outputs``).
"""
from __future__ import annotations

import math
import os
import time

if __name__ == "__main__":  # before torch loads: start again on jemalloc where it is installed (common/heap.py)
    from common.heap import prefer_jemalloc
    prefer_jemalloc()

import torch

from diffusion import mdlm
from runtime.assemble import load_for_inference, load_initial, load_task_data
from runtime import dist, outputs
from common import heap
from common.cli import make_parser, other_steps
from common.errors import UserError, cli_main
from common.stats import ratio_standard_error
from evaluation.baselines import UNIGRAM_CONVENTION, Unigram, lm_lines
from textdata import lm, word_freq


DEFAULT_EVAL_STEPS = 128
DEFAULT_DIR = "generation_results"


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (uses its best)")
    p.add_argument("--split", default="test", choices=lm.SPLITS)
    p.add_argument("--num_examples", type=int, default=1000, help="size of the seeded subset (0: the whole split)")
    p.add_argument("--eval_steps", type=int, default=None,
                   help="K, the grid size of the bound (default 128, or T where the checkpoint has fewer steps); "
                        "for an --objective mdlm checkpoint, the number of stratified draws of t per example of the "
                        f"continuous-time bound; {other_steps('eval_steps')}")
    p.add_argument("--monte_carlo", action="store_true",
                   help="absorbing: one random grid step per example (K times cheaper, noisier); the gaussian "
                        "bound always draws its K steps, and the continuous-time (mdlm) one its K draws of t")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--baselines", action="store_true",
                   help="also the same bound of the untrained network (the run's step-0 weights, rebuilt from its "
                        "config and seed: needs its --model_name_or_path) and an add-one unigram model of the "
                        "training split with the same length term, on the same examples; prints which it beats")
    p.add_argument("--out", default=None, help="JSON output (default: generation_results/elbo_<run>_<checkpoint>_<split>_K<k>_n<n>_seed<s>.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: remove an existing result and any batches an interrupted run kept")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same flags (the same command does it too; --resume "
                        "also refuses when there is nothing to continue)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    heap.fix_mmap_threshold()  # $DLM_MMAP_THRESHOLD, if set: large blocks get their own mappings (common/heap.py)
    if args.num_examples < 0 or args.batch_size < 1 or (args.eval_steps is not None and args.eval_steps < 1):
        raise UserError("need --num_examples >= 0, --batch_size >= 1 and --eval_steps >= 1")
    with outputs.stop_on_signals("elbo"):
        if args.out and os.path.isdir(args.out):
            raise UserError(f"--out {args.out} is a folder; give the JSON file to write")
        outputs.check_writable((os.path.dirname(args.out) or ".") if args.out else DEFAULT_DIR, "--out folder")
        with dist.session(args.device) as info:
            evaluate(args, info)


def evaluate(args, info: dist.DistInfo) -> None:
    device = info.device
    log = info.log
    run = load_for_inference(args.checkpoint, device, task="lm")
    cfg, tok, diffusion = run.cfg, run.tokenizer, run.diffusion
    gaussian, exact = cfg.process == "gaussian", cfg.process == "autoregressive"
    if (gaussian or exact) and args.monte_carlo:
        raise UserError("--monte_carlo is for absorbing checkpoints: " + (
            "the gaussian bound already draws its --eval_steps steps of t at random (stratified)" if gaussian else
            "an autoregressive checkpoint's NLL is exact, one network call per batch"))
    continuous = cfg.objective == "mdlm"
    if continuous and args.monte_carlo:
        raise UserError(f"--monte_carlo: {run.ckpt_dir} was trained with --objective mdlm, whose continuous-time bound "
                        "is always a Monte Carlo estimate; set its number of draws of t with --eval_steps")
    if exact:  # no grid: the likelihood is computed, not bounded; --eval_steps is accepted and has no effect
        if args.eval_steps is not None:
            log(f"note: --eval_steps {args.eval_steps} has no effect on an autoregressive checkpoint (its NLL is exact)")
        args.eval_steps = None
    elif args.eval_steps is None:  # a default the checkpoint cannot honour adapts to it
        args.eval_steps = min(DEFAULT_EVAL_STEPS, cfg.num_steps)
        if args.eval_steps < DEFAULT_EVAL_STEPS:
            log(f"note: --eval_steps defaults to {DEFAULT_EVAL_STEPS}, more than the checkpoint's T={cfg.num_steps} "
                f"diffusion steps; the bound uses K={cfg.num_steps}")
    if not (continuous or exact):  # K draws of t are not limited by T; the exact NLL has no K
        run.check_steps(args.eval_steps, "--eval_steps")
    out = args.out or os.path.join(DEFAULT_DIR, f"elbo_{run.run_name}_{os.path.basename(run.ckpt_dir)}_{args.split}"
                                   f"{'_exact' if exact else f'_K{args.eval_steps}'}_n{args.num_examples}_seed{args.seed}"
                                   f"{'_mc' if args.monte_carlo else ''}{'_baselines' if args.baselines else ''}.json")
    flags = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "out", "overwrite", "resume", "device")}
    output = outputs.open_output([out], out + ".partial", {**flags, "checkpoint": run.ckpt_dir, "device": device.type,
                                                           "checkpoint_files": outputs.checkpoint_files(run.ckpt_dir)},
                                 resume=args.resume, overwrite=args.overwrite, info=info, what="ELBO result")
    if output is None:  # --resume found it finished
        return
    untrained = None
    if args.baselines:  # before the work: it may not load
        log(f"baselines: rebuilding the untrained network from {cfg.model_name_or_path} with seed {cfg.seed}")
        untrained = load_initial(run, device, log)

    splits = ("train", args.split) if args.baselines else (args.split,)  # the unigram counts the training split
    with dist.main_first(info):  # rank 0 builds the datasets cache
        # the run's own batches: dynamic padding (absorbing) or the fixed canvas (gaussian)
        tokenised, collate = load_task_data(cfg, tok, splits, log=log)
    data = tokenised[args.split]
    if args.num_examples and args.num_examples < len(data):
        data = data.shuffle(seed=args.seed).select(range(args.num_examples))
    prior = lm.LengthPrior(run.run_info["derived"]["length_counts"])
    special_ids = lm.collator_for(tok).special_ids  # [CLS]/[SEP] (and BOS/EOS): never counted as tokens
    not_a_token = torch.tensor(special_ids + (tok.pad_token_id,), device=device)
    start = time.time()
    num_batches = -(-len(data) // args.batch_size)

    def batch_at(b: int) -> dict:
        batch = collate([data[j] for j in range(b * args.batch_size, min((b + 1) * args.batch_size, len(data)))])
        return {k: v.to(device) for k, v in batch.items()}

    def wordpieces(batch: dict) -> torch.Tensor:
        """[B, L] bool: the text's wordpieces, what "per token" divides by. Absorbing: the noised positions
        themselves; gaussian: the noised canvas less its [SEP] and padding."""
        return batch["noise_mask"] & ~torch.isin(batch["input_ids"], not_a_token)

    def total(nll_of, what: str, model_key: str = "diffusion_nll", nll_key: str = "nll_bound",
              length_term: bool = True, key: str = "elbo") -> dict | None:
        """Sums over the examples of the model's NLL (``nll_of(batch, gen)``, [B]) and the length NLL (0 without
        ``length_term``), the tokens and words, the perplexities of their total, and ``nll_per_token_se``, the
        standard error of the total per token over examples (delta method: the Monte Carlo error of the x_t
        draws and the sampling error of the examples together); None on ranks other than 0. Each batch's
        sums are kept in ``<out>.partial/<key>/`` as it finishes. Every call walks the
        same batches with the same per-batch seeds, so two models see the same examples, grid steps and noise;
        rank 0 adds the batch sums in batch order (the same float for any number of ranks)."""
        def batch_sums(b: int, gen: torch.Generator):
            batch = batch_at(b)
            n = wordpieces(batch).sum(-1)
            model_nll = nll_of(batch, gen).double().cpu()
            length_nll = -prior.log_prob(n.cpu()).double() if length_term else torch.zeros_like(model_nll)
            return (float(model_nll.sum()), float(length_nll.sum()), int(n.sum()), int(batch["n_words"].sum()),
                    ((model_nll + length_nll).tolist(), n.tolist()))

        def progress(done: int) -> None:
            log(f"{what}: batch {min(done * info.world_size, num_batches)}/{num_batches}, {time.time() - start:.0f}s",
                flush=True)

        sums = dist.map_batches(num_batches, batch_sums, info, args.seed, on_batch=progress, store=output.store(key))
        if sums is None:
            return None
        tot = {model_key: 0.0, "length_nll": 0.0, "tokens": 0, "words": 0}
        for b in range(num_batches):  # a fixed order of addition
            for key, v in zip(tot, sums[b]):
                tot[key] += v
        nll = tot[model_key] + tot["length_nll"]
        se = ratio_standard_error([x for b in range(num_batches) for x in sums[b][4][0]],
                                  [n for b in range(num_batches) for n in sums[b][4][1]])
        return {**tot, nll_key: nll, "ppl_token": math.exp(nll / tot["tokens"]), "ppl_word": math.exp(nll / tot["words"]),
                "nll_per_token_se": se}

    def bound_of(denoiser):
        """The K-step NELBO of ``denoiser`` (docs/algorithms.md §1.9, §2.9), or the exact NLL of an autoregressive
        one (§6): one code path, whatever the weights."""
        if exact:
            return lambda batch, gen: diffusion.nll(lambda x, a, p: denoiser(x, None, a, p), batch["input_ids"],
                                                    batch["attention_mask"])
        if gaussian:
            return lambda batch, gen: diffusion.nelbo(denoiser, batch["input_ids"], batch["noise_mask"],
                                                      args.eval_steps, generator=gen)
        if continuous:
            return lambda batch, gen: mdlm.nelbo(diffusion, denoiser, batch["input_ids"], batch["noise_mask"],
                                                 batch["attention_mask"], args.eval_steps, generator=gen)
        return lambda batch, gen: diffusion.nelbo(denoiser, batch["input_ids"], batch["noise_mask"],
                                                  batch["attention_mask"], args.eval_steps,
                                                  monte_carlo=args.monte_carlo, generator=gen)

    # the gaussian canvas generates [SEP] and the padding, the AR model its [SEP]: no separate length term
    has_length = not (gaussian or exact)
    keys = {"model_key": "model_nll", "nll_key": "nll"} if exact else {}
    tot = total(bound_of(run.denoiser), "exact NLL" if exact else "elbo", length_term=has_length, **keys)
    baselines = {}
    if args.baselines:
        baselines["untrained"] = total(bound_of(untrained), "elbo of the untrained network", length_term=has_length,
                                       key="untrained", **keys)
        V = run.run_info["derived"]["vocab_size"]  # the network's output size
        counts = word_freq.count_tokens(train_rows(tokenised["train"]), V, special_ids)
        unigram = Unigram(counts)
        baselines["unigram"] = total(lambda batch, gen: unigram.nll(batch["input_ids"], wordpieces(batch)),
                                     "unigram", model_key="unigram_nll", nll_key="nll", key="unigram")
        if tot is not None:
            baselines["untrained"]["what"] = ("the same bound of the run's network at step 0 (its config and seed), "
                                              "same examples, grid and seed" if not exact else "the exact NLL of the "
                                              "run's network at step 0 (its config and seed), same examples")
            baselines["unigram"].update(train_tokens=int(counts.sum()), vocab_size=V,
                                        convention=UNIGRAM_CONVENTION)
    if tot is None:  # not rank 0
        return output.finish(info)
    res = exact_result(tot) if exact else bound_result(
        tot, gaussian, {"t_draws": args.eval_steps, "end_jump": diffusion.schedule.end_jump} if continuous else None)
    res = {"checkpoint": run.ckpt_dir, "split": args.split, "num_examples": len(data), "eval_steps": args.eval_steps,
           "monte_carlo": args.monte_carlo, "seed": args.seed, **res,
           "seconds": time.time() - start, "ranks": info.world_size, "resumed_batches": output.resumed}
    if baselines:
        res["baselines"] = baselines
    output.write_json(out, res)
    output.finish(info)
    print(summary_line(res, gaussian, exact) + f"; wrote {out} in {res['seconds']:.0f}s")
    if baselines:
        print("\n".join(lm_lines(res)))


PER_TOKEN = "; per token excludes [CLS]/[SEP]/[PAD]; per word divides by whitespace words of the text"


def bound_result(tot: dict, gaussian: bool, continuous: dict | None) -> dict:
    """The result keys of a diffusion checkpoint's bound: the NELBO per token and its pieces. ``continuous``:
    the draws of t and the end jump of an MDLM checkpoint's continuous-time bound, else None."""
    nll = tot["nll_bound"]
    return {**tot, "nelbo_per_token": nll / tot["tokens"], "nelbo_per_token_se": tot["nll_per_token_se"],
            "ppl_token_diffusion_only": math.exp(tot["diffusion_nll"] / tot["tokens"]), "bound": True,
            "time": "continuous" if continuous is not None else "discrete",
            **(continuous or {}),
            "convention": ("NLL bound = NELBO of the canvas after [CLS] ([SEP] and padding generated, no length term), "
                           "sum over t from K stratified draws" if gaussian else
                           "NLL bound = -log p(n) + continuous-time NELBO (MDLM), a Monte Carlo estimate from K "
                           "stratified draws of t per example plus the exact jump term at t = 1" if continuous is not None else
                           "NLL bound = -log p(n) + K-step diffusion NELBO") + PER_TOKEN}


def exact_result(tot: dict) -> dict:
    """The result keys of an autoregressive checkpoint: its exact NLL (``nll``, ``nll_per_token``), also under the
    bound's names (``nelbo_per_token``: a likelihood is its own tightest bound) so that tables read both alike."""
    per_token = tot["nll"] / tot["tokens"]
    return {**tot, "nll_per_token": per_token, "nelbo_per_token": per_token,
            "nelbo_per_token_se": tot["nll_per_token_se"], "bound": False, "estimator": "exact",
            "convention": "exact NLL = sum over the text's wordpieces and its [SEP] of -log p(token | prefix) (no "
                          "[SEP] term for a text of max_len - 2 wordpieces, whose end is forced)" + PER_TOKEN}


def summary_line(res: dict, gaussian: bool, exact: bool) -> str:
    """The printed result."""
    if exact:
        return (f"exact NLL: {res['num_examples']} {res['split']} examples: {res['nll_per_token']:.4f} "
                f"(+- {res['nll_per_token_se']:.4f}) nats/token; PPL {_ppl(res['ppl_token'])} per wordpiece, "
                f"{_ppl(res['ppl_word'])} per word (the [SEP] term included)")
    grid = (f"continuous time, {res['eval_steps']} draws of t" if res.get("time") == "continuous" else
            f"K={res['eval_steps']}")
    return (f"elbo: {res['num_examples']} {res['split']} examples, {grid}: NELBO "
            f"{res['nelbo_per_token']:.4f} (+- {res['nll_per_token_se']:.4f}) nats/token; "
            f"PPL <= {_ppl(res['ppl_token'])} per wordpiece, <= {_ppl(res['ppl_word'])} per word "
            + ("(no length term: the canvas generates it)" if gaussian else
               f"(length term {res['length_nll'] / res['tokens']:.4f} nats/token)"))


def _ppl(x: float) -> str:
    """Two decimals, or three significant digits once it is astronomical (an untrained or tiny Gaussian LM's
    bound is easily e^100 per token)."""
    return f"{x:.2f}" if x < 1e6 else f"{x:.3g}"


def train_rows(train):
    """The training split's token ids, 100,000 rows at a time flattened by arrow (one bincount per chunk, not
    per row: LM1B has 30M rows)."""
    import pyarrow.compute as pc
    for table in train.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=100_000):
        yield pc.list_flatten(table["input_ids"]).to_numpy()


if __name__ == "__main__":
    main()
