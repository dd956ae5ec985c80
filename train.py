"""Train a diffusion LM: DiffusionBERT (absorbing diffusion on a pretrained BERT-family masked LM) or
Gaussian diffusion on embeddings (--process gaussian: DiffuSeq for seq2seq, Diffusion-LM for lm),
optionally post-trained (Tang et al.).

    python train.py --dataset bible --model_name_or_path minilm --schedule spindle --max_steps 400
    python train.py --task seq2seq --process gaussian --hidden_size 128 --num_layers 2 ...
    python train.py --task lm --process gaussian --num_steps 2000 --emb_dim 16 ...   # Diffusion-LM
    python train.py --task seq2seq --process gaussian --post_train outputs/diffuseq --simi_penalty l2_noise_random ...
    torchrun --nproc_per_node 4 train.py ...            # DDP, decided by the RANK variable

Writes ``<out_dir>/checkpoints/{last,best}`` (see runtime/checkpoint.py), ``<out_dir>/metrics.jsonl``,
``<out_dir>/plots/{train_loss,dev}.png`` (redrawn from the whole log at every evaluation, the last step's
included) and fitlog logs under ``--log_dir``. ``--resume <out_dir>`` continues a run exactly, with the flags
it was started with (runtime/rundir.py). One process at a time writes a run directory (common/lock.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time

if __name__ == "__main__":  # before torch loads: start again on jemalloc where it is installed (common/heap.py)
    from common.heap import prefer_jemalloc
    prefer_jemalloc()

import torch
from torch.utils.data import DataLoader

from common import heap, lock
from common.errors import UserError, cli_main
from evaluation import plots
from runtime import checkpoint, dist, rundir, weights
from runtime.assemble import build_diffusion, check_canvas_memory, initial_network, load_task_data
from runtime.checkpoint import TrainingState
from runtime.config import TrainConfig, build_parser, from_args, given_flags
from runtime.faults import Faults
from runtime.objective import make_objective
from runtime.runlog import RunLogger
from runtime.training import (EMA, ResumableSampler, StopSignals, adamw, compile_problem, lr_lambda, micro_batches,
                              seed_everything)
from textdata import lm, word_freq

TRIM_BUDGET = 0.01  # the share of wall time spent returning freed heap memory (common/heap.Trimmer; $DLM_TRIM_BUDGET)


def post_train_source(cfg: TrainConfig) -> str:
    """The gaussian checkpoint to post-train from; ``cfg`` inherits its network and data settings."""
    ckpt_dir = checkpoint.resolve(cfg.post_train, prefer="best")
    cfg.inherit(checkpoint.read_run_config(ckpt_dir)["config"], ckpt_dir)
    return ckpt_dir


def load_word_freq(cfg: TrainConfig, tokenizer):
    """The spindle schedule's token counts and what identifies them; (None, None) for other schedules."""
    if cfg.schedule != "spindle":
        return None, None
    name = word_freq.data_name(cfg.task, cfg.dataset, cfg.data_files)
    path = cfg.word_freq_file or word_freq.default_path(cfg.model_name_or_path, name)
    data_flag = ((f" --data_files {cfg.data_files}" if cfg.data_files else "")
                 + (" --skip_bad_lines" if cfg.skip_bad_lines else ""))
    hint = (f"python word_freq.py --task {cfg.task} --model_name_or_path {cfg.model_name_or_path} --dataset {cfg.dataset}"
            f"{data_flag}" + (f" --out {path}" if cfg.word_freq_file else ""))
    rec = word_freq.load(path, lm.vocab_fingerprint(tokenizer), len(tokenizer), create_hint=hint)
    return torch.tensor(rec["counts"]), {"path": path, "sha256": rec["sha256"], "tokenizer": rec["tokenizer"],
                                         "dataset": rec["dataset"]}


def draw_plots(out_dir: str, warn) -> None:
    """Redraw ``<out_dir>/plots`` from metrics.jsonl. A plot is not worth a run: a failure is one warning."""
    try:
        plots.draw_training_plots(out_dir)
    except Exception as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the message
        warn(f"warning: could not draw {os.path.join(out_dir, plots.PLOTS_DIR)} ({why}); training goes on")


def prepare_resume(cfg: TrainConfig, given: set[str], main_rank: bool, log) -> rundir.Resumed | None:
    """What ``--resume`` continues, checked (runtime/rundir.py); None when the run is already at --max_steps."""
    out_dir = cfg.out_dir if "out_dir" in given else rundir.run_dir_of(cfg.resume)
    if main_rank and out_dir:  # before reading a run that another process may be writing
        lock.refuse_if_held(out_dir)
    resumed = rundir.plan(cfg, given, dist.env_world_size(), log, lambda msg: log(msg, file=sys.stderr, flush=True))
    cfg = resumed.cfg
    in_place = rundir.same_dir(cfg.out_dir, rundir.run_dir_of(resumed.ckpt_dir) or resumed.ckpt_dir)
    if cfg.overwrite and in_place:
        raise UserError(f"--overwrite would delete the run that --resume {cfg.resume} continues; drop one of them")
    if not in_place:  # continued into another folder: that one must be free
        rundir.check_fresh(cfg.out_dir, cfg.overwrite)
    step = resumed.training_state["step"]
    if step >= cfg.max_steps:
        log(f"resume: {resumed.ckpt_dir} is at step {step}, --max_steps {cfg.max_steps}: nothing to do "
            "(raise --max_steps to train on); nothing was written")
        return None
    return resumed


@cli_main
def main(argv=None):
    parser = build_parser(TrainConfig, __doc__)
    cfg = from_args(parser.parse_args(argv))
    main_rank = dist.env_rank() == 0  # under torchrun rank 0 alone takes the lock and speaks
    log = print if main_rank else (lambda *a, **k: None)
    # before the model loads: with $DLM_MMAP_THRESHOLD set, large blocks (the [N, V] logits) get their own
    # mappings instead of the heap (common/heap.py; off by default)
    threshold = heap.fix_mmap_threshold()
    trim_budget = heap.trim_budget(TRIM_BUDGET)  # a bad $DLM_TRIM_BUDGET fails here, before the run directory
    resumed = None
    if cfg.resume:
        resumed = prepare_resume(cfg, given_flags(parser, argv), main_rank, log)
        if resumed is None:
            return
        cfg, post_dir = resumed.cfg, resumed.run_config["derived"].get("post_trained_from")
    else:
        post_dir = post_train_source(cfg) if cfg.post_train else None  # before the checks: it fills in flags
        cfg.check()
        check_canvas_memory(cfg)  # gaussian: before the run directory is made
        if main_rank:
            lock.refuse_if_held(cfg.out_dir)
        rundir.check_fresh(cfg.out_dir, cfg.overwrite)
    # the kernel drops the lock when the process ends, however it ends: a killed run leaves none behind
    with lock.held(cfg.out_dir, "run directory") if main_rank else contextlib.nullcontext():
        with dist.session(cfg.device) as info:
            info.log(f"malloc: {heap.malloc_name()}" + (f", mmap threshold fixed at {threshold / 2**20:g} MB "
                                                       f"(${heap.THRESHOLD_ENV})" if threshold else "")
                     + ("" if trim_budget else ", no trims") + " (common/heap.py)")
            run(cfg, info, info.log, resumed, post_dir, trim_budget)


def run(cfg: TrainConfig, info: dist.DistInfo, log, resumed: rundir.Resumed | None,
        post_dir: str | None = None, trim_budget: float = TRIM_BUDGET) -> None:
    device = info.device
    if cfg.compile and (problem := compile_problem(device)):
        raise UserError(f"--compile: {problem}")
    ckpt_root = os.path.join(cfg.out_dir, "checkpoints")
    use_bf16 = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # softmax gradients over a 30k vocabulary underflow to denormals, which are very slow on x86
        # CPUs (DiffuSeq's rounding head: 1.23 -> 0.77 s per step in our measurement); flush them to 0
        torch.set_flush_denormal(True)

    # ---- model, process and objective
    # seeded with cfg.seed, so every rank (and compute_elbo.py --baselines) builds the same network
    denoiser, tokenizer, model_path, hf_config = initial_network(cfg, log)
    if post_dir and not resumed:
        if lm.vocab_fingerprint(tokenizer) != checkpoint.read_run_config(post_dir)["derived"]["vocab_fingerprint"]:
            raise UserError(f"--post_train {post_dir} was trained with another tokenizer than {model_path}")
        weights.load_into(post_dir, denoiser, "ema")
        log(f"post-training: starting from the EMA weights of {post_dir}; penalty {cfg.simi_penalty}"
            + (f" (lambda {cfg.simi_lambda}, noise {cfg.simi_noise}, maps {cfg.simi_maps})" if cfg.simi_penalty != "none"
               else " (--simi_penalty none: plain continued training)"))
    denoiser.to(device)
    counts, wf_identity = load_word_freq(cfg, tokenizer)
    diffusion = build_diffusion(cfg, tokenizer.mask_token_id, tokenizer.pad_token_id, counts, tokenizer)
    objective = make_objective(denoiser, diffusion, cfg)
    if cfg.compile:  # the encoder only: the loss selects a data-dependent number of positions
        objective.compile_target.compile(dynamic=True)
    ema = EMA(denoiser, cfg.ema_rate) if objective.keeps_ema else None

    # ---- data (rank 0 builds the corpus and the tokenisation cache first)
    with dist.main_first(info):
        data, collate = load_task_data(cfg, tokenizer, ("train", "valid"), log=log)
    train_set, valid_set = data["train"], data["valid"]
    dev = valid_set.shuffle(seed=cfg.seed).select(range(min(cfg.eval_examples, len(valid_set))))
    dev_loader = DataLoader(dev.select(range(info.rank, len(dev), info.world_size)), batch_size=cfg.batch_size,
                            collate_fn=collate)
    log(f"data: {cfg.dataset}: {len(train_set)} train / {len(valid_set)} valid lines; "
        f"dev {objective.dev_description} on {min(cfg.eval_examples, len(valid_set))} examples")
    derived = {"vocab_size": hf_config.vocab_size, "mask_id": tokenizer.mask_token_id,
               "pad_id": tokenizer.pad_token_id, "vocab_fingerprint": lm.vocab_fingerprint(tokenizer),
               "model_path": model_path,
               "length_counts": lm.length_counts(train_set, cfg.max_len) if cfg.task == "lm" else None,
               "word_freq": wf_identity, "post_trained_from": post_dir,
               "schedule": diffusion.describe()}

    # ---- optimisation, and where the run starts
    optim = adamw(denoiser.parameters(), cfg.lr, cfg.weight_decay, device)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg.warmup_steps, cfg.max_steps, cfg.decay,
                                                                    cfg.lr_schedule))
    model = objective  # one forward per micro-step, even when the loss calls the network twice
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    state = TrainingState(denoiser, optim, sched, objective, ema)
    if resumed:
        state.restore(resumed.ckpt_dir, info.rank, resumed.training_state, cfg.seed)
        log(f"resume: {resumed.ckpt_dir} at step {state.step} (epoch {state.epoch}, example {state.position}); "
            f"continuing in {cfg.out_dir}")
    else:
        seed_everything(cfg.seed + info.rank)  # different noise on every rank

    run_info = {"config": dataclasses.asdict(cfg), "derived": derived}
    if resumed:  # the model card of a save before the next evaluation names the latest one
        run_info["latest_dev"] = resumed.run_config.get("latest_dev")
    files = {"hf_config": hf_config, "tokenizer": tokenizer,
             "extra_files": {"word_freq.json": wf_identity["path"]} if wf_identity else None}

    def save(name: str, **extra) -> None:  # every rank calls it (it gathers the RNG states); rank 0 writes
        state.save(os.path.join(ckpt_root, name), info, {**run_info, **extra},
                   with_training_state=name == "last" or cfg.save_training_state == "all", **files)

    # ---- the loop
    from tqdm import tqdm

    if cfg.overwrite and not resumed and info.is_main:  # only now, when the new run is about to write
        gone = rundir.clear(cfg.out_dir)
        if gone:
            log(f"--overwrite: deleted the earlier run's {', '.join(gone)} in {cfg.out_dir}")
    logger = RunLogger(cfg.out_dir, cfg.log_dir, dataclasses.asdict(cfg), enabled=info.is_main)
    pbar = tqdm(total=cfg.max_steps, initial=state.step, disable=not info.is_main, dynamic_ncols=True,
                desc="train", file=sys.stdout, mininterval=1.0)
    # workers overlap collation with the GPU's work; on the CPU they would only take its cores
    num_workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if device.type == "cuda" else 0)
    batches = micro_batches(train_set, ResumableSampler(train_set, info.world_size, info.rank, cfg.seed), state,
                            batch_size=cfg.batch_size, collate_fn=collate, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
    faults = Faults.from_env(info.rank)  # test hooks (runtime/faults.py); off in a normal run
    stop = StopSignals(device)  # SIGINT/SIGTERM: finish the step, save checkpoints/last, exit 128 + signum
    denoiser.train()
    t_last, tok_since, run_start = time.time(), 0, time.time()
    bad_in_row = bad_total = 0
    trimmer = heap.Trimmer(trim_budget)
    while state.step < cfg.max_steps:
        step = state.step + 1  # the optimizer step being taken, counted from 1
        faults.before_step(step)
        optim.zero_grad(set_to_none=True)
        stats = torch.zeros(len(objective.stat_names), dtype=torch.float64, device=device)
        for micro in range(cfg.accumulation_steps):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            # DDP averages the gradients once, in the backward pass of the last micro-batch
            sync = model.no_sync() if info.enabled and micro < cfg.accumulation_steps - 1 else contextlib.nullcontext()
            with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(batch)
                faults.poison_loss(out, step)
                (out.loss / cfg.accumulation_steps).backward()  # mean, not sum, over micro-batches
            if cfg.grad_clip_value > 0:  # DiffusionBERT clips by value after every micro-batch
                torch.nn.utils.clip_grad_value_(denoiser.parameters(), cfg.grad_clip_value)
            objective.after_backward(out, info)
            stats += objective.stats(out)
            tok_since += int(batch["attention_mask"].sum())
        # DDP has averaged the gradients, so a non-finite loss on any rank makes the norm non-finite on
        # every rank: all ranks skip the same updates without extra communication
        norm = torch.nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if torch.isfinite(norm) and torch.isfinite(stats[0]):
            optim.step()
            if ema is not None:
                ema.update()
            bad_in_row = 0
        else:
            bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
            if info.is_main:
                pbar.write(f"step {step}: non-finite loss or gradient, update skipped ({bad_in_row} in a row, "
                           f"{bad_total} in all)")
            logger.log(step, "skip", skipped_in_row=bad_in_row, skipped_total=bad_total)
        sched.step()
        state.step = step
        pbar.update(1)
        if bad_in_row >= cfg.max_bad_steps:
            save("last")  # no update since the last finite one: this is the last good state
            pbar.close()
            logger.close()
            raise UserError(f"{bad_in_row} non-finite losses in a row at step {step}; stopped. The last good state "
                            f"is in {ckpt_root}/last (resume with --resume {cfg.out_dir}); lower --lr, keep "
                            f"--grad_clip on, or check the data")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            dist.all_reduce_sum(stats, info)
            now = time.time()
            tok_s = tok_since * info.world_size / max(now - t_last, 1e-9)
            t_last, tok_since = now, 0
            metrics = {**objective.summarise(stats, cfg.accumulation_steps * info.world_size),
                       "lr": sched.get_last_lr()[0], "tokens_per_s": tok_s, "skipped_steps": bad_total}
            pbar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{tok_s:.0f}")
            logger.log(step, "train", **metrics)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            dev_metrics = objective.evaluate(dev_loader, ema, info, cfg.seed, use_bf16)
            logger.log(step, "dev", **dev_metrics)
            run_info["latest_dev"] = {"step": step, **dev_metrics}
            if info.is_main:
                pbar.write(f"step {step}: {objective.format_dev(dev_metrics)}")
                draw_plots(cfg.out_dir, pbar.write)  # the last step evaluates too: the end of the run is drawn
            if dev_metrics[objective.dev_key] < state.best:
                state.best = dev_metrics[objective.dev_key]
                logger.best(**dev_metrics)
                save("best", dev=dev_metrics)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save("last")
            if cfg.keep_last and info.is_main:
                checkpoint.snapshot(ckpt_root, "last", step, cfg.keep_last, cfg.save_training_state == "all")
        trimmer.maybe()  # freed heap pages back to the system: the RSS stays flat (common/heap.py)
        signum = stop.received(info)  # a signal seen by one rank stops every rank
        if signum and step < cfg.max_steps:
            save("last")
            pbar.close()
            logger.close()
            log(f"received {signal.Signals(signum).name}: saved {ckpt_root}/last at step {step}; "
                f"continue with --resume {cfg.out_dir}")
            raise SystemExit(128 + signum)
    stop.restore()
    pbar.close()
    logger.close()
    written = [n for n in ("best", "last") if os.path.isdir(os.path.join(ckpt_root, n))]
    log(f"done: {state.step} steps in {time.time() - run_start:.0f}s; best dev {objective.dev_key} {state.best:.4f}; "
        f"checkpoints in {ckpt_root}/{{{','.join(written)}}}, plots in {os.path.join(cfg.out_dir, plots.PLOTS_DIR)}")


if __name__ == "__main__":
    main()
