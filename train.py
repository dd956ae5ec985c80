"""Train a diffusion LM: DiffusionBERT (absorbing diffusion on a pretrained BERT-family masked LM) or
DiffuSeq (Gaussian diffusion on embeddings, --process gaussian), optionally post-trained (Tang et al.).

    python train.py --dataset bible --model_name_or_path minilm --schedule spindle --max_steps 400
    python train.py --task seq2seq --process gaussian --hidden_size 128 --num_layers 2 ...
    python train.py --task seq2seq --process gaussian --post_train outputs/diffuseq --simi_penalty l2_noise_random ...
    torchrun --nproc_per_node 4 train.py ...            # DDP, decided by the RANK variable

Writes ``<out_dir>/checkpoints/{last,best}`` (see runtime/checkpoint.py), ``<out_dir>/metrics.jsonl``
and fitlog logs under ``--log_dir``. ``--resume <out_dir>`` continues a run exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time

import torch
from torch.utils.data import DataLoader

from runtime import checkpoint, dist
from common.loading import check_tokenizer, load_masked_lm, load_tokenizer
from runtime.assemble import build_denoiser, build_diffusion, build_gaussian_denoiser, load_task_data
from runtime.config import TrainConfig, build_parser, from_args, from_dict
from common.errors import UserError, cli_main, require_at_least_one
from runtime.objective import Objective
from runtime.runlog import RunLogger
from runtime.training import ResumableSampler, lr_lambda, rng_state, seed_everything, set_rng_state
from textdata import lm, word_freq

# Settings that may change between a run and its resumption; anything else must match.
RESUMABLE_CHANGES = {"resume", "max_steps", "eval_every", "save_every", "log_every", "device",
                     "num_workers", "overwrite", "log_dir", "eval_examples", "keep_last", "max_bad_steps",
                     "out_dir", "compile"}  # a run directory may be moved or copied and resumed there
# What a --post_train run must share with the checkpoint it starts from (the network and its inputs).
POST_TRAIN_SAME = ("process", "task", "model_name_or_path", "emb_dim", "hidden_size", "num_layers", "num_heads",
                   "max_len", "num_steps", "schedule", "dataset", "data_files")
PROCESS_SCHEDULES = {"absorbing": ("mutual", "cosine", "spindle"), "gaussian": ("sqrt", "linear", "cosine")}


def check_config(cfg: TrainConfig) -> None:
    """Reject impossible flag combinations before any work is done; resolve ``--schedule auto``."""
    if cfg.schedule == "auto":
        cfg.schedule = "sqrt" if cfg.process == "gaussian" else "spindle" if cfg.task == "lm" else "mutual"
    if cfg.schedule not in PROCESS_SCHEDULES[cfg.process]:
        raise UserError(f"--schedule {cfg.schedule} is not a {cfg.process} schedule; choose one of "
                        f"{', '.join(PROCESS_SCHEDULES[cfg.process])}")
    require_at_least_one(cfg, "batch_size", "accumulation_steps", "max_steps", "num_steps", "max_len",
                         "eval_steps", "eval_examples", "save_every", "log_every", "max_bad_steps")
    if cfg.num_workers < -1:
        raise UserError(f"--num_workers must be -1 (automatic) or more, got {cfg.num_workers}")
    if cfg.keep_last < 0:
        raise UserError(f"--keep_last must be 0 or more, got {cfg.keep_last}")
    if cfg.process == "gaussian":
        if cfg.task != "seq2seq":
            raise UserError("--process gaussian (DiffuSeq) is a seq2seq model; add --task seq2seq")
        if cfg.time_conditioning != "none" or cfg.from_scratch:
            raise UserError("--time_conditioning and --from_scratch are --process absorbing flags (the gaussian "
                            "transformer is always trained from scratch and always conditioned on t)")
        if cfg.loss_weighting != "elbo":
            raise UserError("--loss_weighting released is DiffusionBERT's (--process absorbing) objective")
        require_at_least_one(cfg, "emb_dim", "hidden_size", "num_layers", "num_heads")
        if not 0.0 <= cfg.ema_rate < 1.0:
            raise UserError(f"--ema_rate must be in [0, 1), got {cfg.ema_rate}")
        if cfg.simi_noise <= 0:
            raise UserError(f"--simi_noise must be positive, got {cfg.simi_noise}")
        if cfg.simi_penalty != "none" and cfg.simi_lambda > 0:
            raise UserError(f"--simi_lambda must be 0 or negative with the l2 penalty (the loss subtracts "
                            f"simi_lambda * penalty; the released -2 is a weight of 1), got {cfg.simi_lambda}")
    elif cfg.post_train or cfg.simi_penalty != "none":
        raise UserError("--post_train and --simi_penalty are for --process gaussian (Tang et al.'s post-training)")

    if cfg.eval_steps > cfg.num_steps:
        raise UserError(f"--eval_steps {cfg.eval_steps} exceeds the number of diffusion steps T={cfg.num_steps}")
    if cfg.task == "lm":
        if cfg.dataset not in lm.DATASETS:
            raise UserError(f"--task lm: unknown --dataset {cfg.dataset!r}; choose one of {', '.join(lm.DATASETS)}")
        if cfg.dataset == "text" and not cfg.data_files:
            raise UserError("--dataset text needs --data_files")
        if cfg.dataset != "text" and cfg.data_files:
            raise UserError(f"--data_files is only used with --dataset text (got --dataset {cfg.dataset})")
    elif cfg.dataset != "bible" and not cfg.data_files:
        raise UserError(f"--task seq2seq --dataset {cfg.dataset} needs --data_files, a DiffuSeq folder with "
                        "train.jsonl, valid.jsonl and test.jsonl")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")


def resume_source(cfg: TrainConfig):
    """The checkpoint to resume from, after checking that its config matches this one."""
    ckpt_dir = checkpoint.resolve(cfg.resume, prefer="last")
    raw = checkpoint.read_run_config(ckpt_dir)["config"]
    if raw.get("simi_penalty", "none") != "none" and "simi_maps" not in raw:
        raise UserError(f"{ckpt_dir} was post-trained before the loss followed Tang et al.'s release (penalty weight "
                        "twice the released one, MSE target z0); it cannot be resumed: post-train again")
    stored = from_dict(raw)
    diffs = [f"--{f.name}: checkpoint {getattr(stored, f.name)!r} vs now {getattr(cfg, f.name)!r}"
             for f in dataclasses.fields(cfg)
             if f.name not in RESUMABLE_CHANGES and getattr(stored, f.name) != getattr(cfg, f.name)]
    if diffs:
        raise UserError(f"cannot resume {ckpt_dir} with another config ({'; '.join(diffs)})")
    if not os.path.isfile(os.path.join(ckpt_dir, "training_state.pt")):
        raise UserError(f"{ckpt_dir} has no training_state.pt to resume from")
    return ckpt_dir


def post_train_source(cfg: TrainConfig) -> str:
    """The gaussian checkpoint to post-train from. Its network and data settings (POST_TRAIN_SAME) are
    inherited where this run leaves them at their defaults; a different explicit value is an error."""
    ckpt_dir = checkpoint.resolve(cfg.post_train, prefer="best")
    stored = from_dict(checkpoint.read_run_config(ckpt_dir)["config"])
    if stored.process != "gaussian":
        raise UserError(f"--post_train {ckpt_dir} is a {stored.process} checkpoint; post-training needs a gaussian one")
    defaults = TrainConfig()
    diffs = []
    for k in POST_TRAIN_SAME:
        mine, theirs = getattr(cfg, k), getattr(stored, k)
        if mine == getattr(defaults, k):
            setattr(cfg, k, theirs)
        elif mine != theirs:
            diffs.append(f"--{k}: checkpoint {theirs!r} vs now {mine!r}")
    if diffs:
        raise UserError(f"--post_train {ckpt_dir} was trained with other settings ({'; '.join(diffs)})")
    return ckpt_dir


def load_word_freq(cfg: TrainConfig, tokenizer):
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


def set_dropout(model: torch.nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


@cli_main
def main(argv=None):
    cfg = from_args(build_parser(TrainConfig, __doc__.splitlines()[0]).parse_args(argv))
    post_dir = post_train_source(cfg) if cfg.post_train else None  # before the checks: it fills in flags
    check_config(cfg)
    resume_dir = resume_source(cfg) if cfg.resume else None
    ckpt_root = os.path.join(cfg.out_dir, "checkpoints")
    if not resume_dir and os.path.isdir(ckpt_root) and os.listdir(ckpt_root) and not cfg.overwrite:
        raise UserError(f"{cfg.out_dir} already holds checkpoints; use --resume {cfg.out_dir} to continue, "
                        "--overwrite to start over, or another --out_dir")

    with dist.session(cfg.device) as info:
        run(cfg, info, info.log, resume_dir, post_dir)


def build_model(cfg: TrainConfig, log):
    """(denoiser, tokenizer, model_path, hf_config) for the run's process."""
    if cfg.process == "gaussian":
        tokenizer, model_path = load_tokenizer(cfg.model_name_or_path)
        denoiser = build_gaussian_denoiser(cfg, len(tokenizer))
        n = sum(p.numel() for p in denoiser.parameters())
        log(f"model: DiffuSeq transformer from scratch, {n / 1e6:.2f}M parameters (emb {cfg.emb_dim}, hidden "
            f"{cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, vocab {len(tokenizer)} from {model_path})")
        return denoiser, tokenizer, model_path, denoiser.config
    mlm, tokenizer, model_path = load_masked_lm(cfg.model_name_or_path, cfg.from_scratch, log=log)
    check_tokenizer(tokenizer, mlm.config.vocab_size, model_path)
    if cfg.max_len + (cfg.time_conditioning == "token") > mlm.config.max_position_embeddings:
        raise UserError(f"--max_len {cfg.max_len} exceeds the model's {mlm.config.max_position_embeddings} positions")
    if cfg.dropout is not None:
        set_dropout(mlm, cfg.dropout)
    return build_denoiser(cfg, mlm, tokenizer), tokenizer, model_path, mlm.config


def run(cfg: TrainConfig, info: dist.DistInfo, log, resume_dir: str | None, post_dir: str | None = None) -> None:

    device = info.device
    ckpt_root = os.path.join(cfg.out_dir, "checkpoints")
    seed_everything(cfg.seed)  # identical initialisation on every rank
    use_bf16 = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # softmax gradients over a 30k vocabulary underflow to denormals, which are very slow on x86
        # CPUs (DiffuSeq's rounding head: 1.23 -> 0.77 s per step in our measurement); flush them to 0
        torch.set_flush_denormal(True)

    # ---- model and tokenizer
    denoiser, tokenizer, model_path, hf_config = build_model(cfg, log)
    if post_dir and not resume_dir:
        state = checkpoint.load_state(post_dir, "ema.pt")
        if lm.vocab_fingerprint(tokenizer) != checkpoint.read_run_config(post_dir)["derived"]["vocab_fingerprint"]:
            raise UserError(f"--post_train {post_dir} was trained with another tokenizer than {model_path}")
        denoiser.load_state_dict(state)
        log(f"post-training: starting from the EMA weights of {post_dir}")
    denoiser.to(device)
    if cfg.compile:  # the encoder only: the loss selects a data-dependent number of positions
        encoder = denoiser.mlm.base_model if cfg.process == "absorbing" else denoiser.encoder
        encoder.compile(dynamic=True)
    ema = None
    if cfg.process == "gaussian":
        ema = [p.detach().clone() for p in denoiser.parameters()]
    counts, wf_identity = load_word_freq(cfg, tokenizer)
    diffusion = build_diffusion(cfg, tokenizer.mask_token_id, tokenizer.pad_token_id, counts)

    # ---- data (rank 0 builds the corpus and the tokenisation cache first)
    if not info.is_main:
        dist.barrier(info)
    data, collate = load_task_data(cfg, tokenizer, ("train", "valid"), log=log)
    if info.is_main:
        dist.barrier(info)
    train_set, valid_set = data["train"], data["valid"]
    dev = valid_set.shuffle(seed=cfg.seed).select(range(min(cfg.eval_examples, len(valid_set))))
    dev = dev.select(range(info.rank, len(dev), info.world_size))
    log(f"data: {cfg.dataset}: {len(train_set)} train / {len(valid_set)} valid lines; "
        f"dev {'loss (EMA weights)' if cfg.process == 'gaussian' else f'ELBO, K={cfg.eval_steps},'} on "
        f"{min(cfg.eval_examples, len(valid_set))} examples")

    derived = {"vocab_size": hf_config.vocab_size, "mask_id": tokenizer.mask_token_id,
               "pad_id": tokenizer.pad_token_id, "vocab_fingerprint": lm.vocab_fingerprint(tokenizer),
               "model_path": model_path,
               "length_counts": lm.length_counts(train_set, cfg.max_len) if cfg.task == "lm" else None,
               "word_freq": wf_identity, "post_trained_from": post_dir,
               "schedule": (diffusion.describe(cfg.schedule) if cfg.process == "gaussian"
                            else diffusion.schedule.describe())}

    # ---- optimisation
    params = [p for p in denoiser.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                              fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg.warmup_steps, cfg.max_steps, cfg.decay))
    objective = Objective(denoiser, diffusion, cfg)
    model = objective  # one forward per micro-step, even when the loss calls the network twice
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    ema_updates = 0

    sampler = ResumableSampler(train_set, info.world_size, info.rank, cfg.seed)
    step, epoch, pos, best = 0, 0, 0, float("inf")
    if resume_dir:
        denoiser.load_state_dict(checkpoint.load_state(resume_dir, "model.pt", map_location=device))
        ts = checkpoint.load_state(resume_dir, "training_state.pt")
        optim.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        step, epoch, pos, best = ts["step"], ts["epoch"], ts["position"], ts["best"]
        objective.load_state_dict_extra(ts)
        if ema is not None:
            ema_saved = checkpoint.load_state(resume_dir, "ema.pt", map_location=device)
            for (n, _), e in zip(denoiser.named_parameters(), ema):
                e.copy_(ema_saved[n])
            ema_updates = ts["ema_updates"]
        set_rng_state(ts["rng"][info.rank] if info.rank < len(ts["rng"]) else ts["rng"][0])
        log(f"resume: {resume_dir} at step {step} (epoch {epoch}, example {pos * info.world_size})")
    else:
        seed_everything(cfg.seed + info.rank)  # different noise on every rank

    logger = RunLogger(cfg.out_dir, cfg.log_dir, dataclasses.asdict(cfg), enabled=info.is_main)
    if info.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)

    # workers overlap collation with the GPU's work; on the CPU they would only take its cores
    num_workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if device.type == "cuda" else 0)

    def make_loader(epoch: int, start: int):
        sampler.set_position(epoch, start)
        return DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=False,
                          generator=torch.Generator())  # keeps the global RNG untouched (exact resume)

    def save(name: str, extra: dict | None = None) -> None:
        states = [rng_state()]
        if info.enabled:
            states = [None] * info.world_size
            torch.distributed.all_gather_object(states, rng_state())
        if not info.is_main:
            return
        run_config = {"config": dataclasses.asdict(cfg), "derived": derived,
                      "step": step, f"best_dev_{objective.dev_key}": best, **(extra or {})}
        training_state = {"optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "step": step,
                          "epoch": epoch, "position": pos, "best": best, "rng": states,
                          "ema_updates": ema_updates, **objective.state_dict_extra()}
        files = {"word_freq.json": wf_identity["path"]} if wf_identity else None
        ema_state = None
        if ema is not None:
            ema_state = denoiser.state_dict()  # buffers as they are, parameters replaced by their averages
            ema_state.update({n: e.clone() for (n, _), e in zip(denoiser.named_parameters(), ema)})
            ema_state = {"ema.pt": ema_state}
        checkpoint.save(os.path.join(ckpt_root, name), run_config=run_config, model_state=denoiser.state_dict(),
                        hf_config=hf_config, tokenizer=tokenizer, training_state=training_state, extra_files=files,
                        extra_states=ema_state)

    @torch.no_grad()
    def update_ema() -> None:
        """EMA with decay min(ema_rate, (1 + n) / (10 + n)): early on the average forgets the random
        initialisation quickly; after about 90k updates it is DiffuSeq's constant 0.9999."""
        nonlocal ema_updates
        rate = min(cfg.ema_rate, (1 + ema_updates) / (10 + ema_updates))
        torch._foreach_lerp_(ema, [p.detach() for p in denoiser.parameters()], 1.0 - rate)
        ema_updates += 1

    @torch.no_grad()
    def evaluate() -> dict:
        """Dev metric on the fixed subset with a fixed generator: absorbing, the Monte Carlo NELBO over the
        K-step grid; gaussian, the unweighted loss at uniform t, computed with the EMA weights."""
        swapped = None
        if ema is not None:
            swapped = [p.detach().clone() for p in denoiser.parameters()]
            torch._foreach_copy_([p.data for p in denoiser.parameters()], ema)
        denoiser.eval()
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        tot = None
        for batch in DataLoader(dev, batch_size=cfg.batch_size, collate_fn=collate):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                part = objective.dev_totals(denoiser, batch, gen)
            tot = part if tot is None else tot + part
        dist.all_reduce_sum(tot, info)
        if swapped is not None:
            torch._foreach_copy_([p.data for p in denoiser.parameters()], swapped)
        denoiser.train()
        return objective.dev_metrics(tot)

    # ---- the loop
    from tqdm import tqdm

    loader_iter = iter(make_loader(epoch, pos))
    pbar = tqdm(total=cfg.max_steps, initial=step, disable=not info.is_main, dynamic_ncols=True,
                desc="train", file=sys.stdout, mininterval=1.0)
    denoiser.train()
    t_last, tok_since = time.time(), 0
    run_start = time.time()
    bad_in_row = bad_total = 0
    # test hooks: make the loss NaN at these (1-based) steps, e.g. DLM_FAULT_NAN_STEPS=3,4; raise a
    # RuntimeError at step DLM_FAULT_RAISE_STEP; DLM_FAULT_RANK=r restricts both to rank r
    faulty = os.environ.get("DLM_FAULT_RANK", str(info.rank)) == str(info.rank)
    fault_nan = {int(x) for x in os.environ.get("DLM_FAULT_NAN_STEPS", "").split(",") if x.strip() and faulty}
    fault_raise = int(os.environ.get("DLM_FAULT_RAISE_STEP", "0")) if faulty else 0

    # SIGINT/SIGTERM: finish the current step, save checkpoints/last, exit with 128 + signal number. When
    # torchrun sends SIGTERM because another rank died, this rank's next collective raises instead (gloo:
    # "Connection closed by peer") and it exits with that error; torchrun SIGKILLs one still busy after 30 s
    stop_signal = torch.zeros(1, device=device)
    def on_signal(signum, frame):
        stop_signal.fill_(signum)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    while step < cfg.max_steps:
        if step + 1 == fault_raise:
            raise RuntimeError(f"DLM_FAULT_RAISE_STEP: injected failure at step {step + 1} on rank {info.rank}")
        optim.zero_grad(set_to_none=True)
        stats = torch.zeros(len(objective.stat_names), dtype=torch.float64, device=device)
        for micro in range(cfg.accumulation_steps):
            try:
                batch = next(loader_iter)
            except StopIteration:
                epoch, pos = epoch + 1, 0
                loader_iter = iter(make_loader(epoch, 0))
                batch = next(loader_iter)
            pos += batch["input_ids"].shape[0]
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            last = micro == cfg.accumulation_steps - 1
            sync = contextlib.nullcontext() if (last or not info.enabled) else model.no_sync()
            with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(batch)
                if step + 1 in fault_nan:
                    out.loss = out.loss * float("nan")
                (out.loss / cfg.accumulation_steps).backward()  # mean, not sum, over micro-batches
            objective.after_backward(out, info)
            stats += objective.stats(out)
            tok_since += int(batch["attention_mask"].sum())
        # DDP has averaged the gradients, so a non-finite loss on any rank makes the norm non-finite on
        # every rank: all ranks skip the same updates without extra communication
        norm = torch.nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if torch.isfinite(norm) and torch.isfinite(stats[0]):
            optim.step()
            if ema is not None:
                update_ema()
            bad_in_row = 0
        else:
            bad_in_row += 1
            bad_total += 1
            if info.is_main:
                pbar.write(f"step {step + 1}: non-finite loss or gradient, update skipped ({bad_in_row} in a row, "
                           f"{bad_total} in all)")
            logger.log(step + 1, "skip", skipped_in_row=bad_in_row, skipped_total=bad_total)
        sched.step()
        step += 1
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
            loss = metrics["loss"]
            pbar.set_postfix(loss=f"{loss:.3f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{tok_s:.0f}")
            logger.log(step, "train", **metrics)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            dev_metrics = evaluate()
            logger.log(step, "dev", **dev_metrics)
            if info.is_main and objective.gaussian:
                pbar.write(f"step {step}: dev loss (EMA) {dev_metrics['loss']:.4f}  mse {dev_metrics['mse']:.4f}")
            elif info.is_main:
                per_word = f"  PPL/word {dev_metrics['ppl_word']:.2f}" if "ppl_word" in dev_metrics else ""
                pbar.write(f"step {step}: dev NELBO/token {dev_metrics['nelbo_per_token']:.4f}  "
                           f"PPL/token {dev_metrics['ppl_token']:.2f}{per_word}")
            if dev_metrics[objective.dev_key] < best:
                best = dev_metrics[objective.dev_key]
                logger.best(step, **dev_metrics)
                save("best", {"dev": dev_metrics})
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save("last")
            if cfg.keep_last and info.is_main:
                checkpoint.snapshot(ckpt_root, "last", step, cfg.keep_last)
        if info.enabled:
            dist.all_reduce_max(stop_signal, info)  # a signal seen by one rank stops every rank
        if stop_signal.item() and step < cfg.max_steps:
            signum = int(stop_signal.item())
            save("last")
            pbar.close()
            logger.close()
            log(f"received {signal.Signals(signum).name}: saved {ckpt_root}/last at step {step}; "
                f"continue with --resume {cfg.out_dir}")
            raise SystemExit(128 + signum)
    for s_, h in previous.items():
        signal.signal(s_, h)
    pbar.close()
    logger.close()
    log(f"done: {step} steps in {time.time() - run_start:.0f}s; best dev {objective.dev_key} {best:.4f}; "
        f"checkpoints in {ckpt_root}/{{best,last}}")


if __name__ == "__main__":
    main()
