"""The paper presets against the released command lines.

Each preset is run as ``DRY_RUN=1 bash run.sh PRESET`` (or run_condition.sh), which prints the commands it would
run; the train.py and decoder lines are parsed with the scripts' own parsers, so every default is filled in. The
result is compared, flag by flag, with a transcription written here of the released script's command line and
its argparse defaults (and config.json for DiffuSeq), read from the public repositories:

* Hzfinfdu/Diffusion-BERT @ 19d7f49: run.sh, DDP_main.py, run_condition.sh, DDP_main_conditional.py,
  dataloader.py, predict.py, predict_downstream_condition.py;
* Shark-NLP/DiffuSeq @ 8bfafcb (the paper's code) and its README: scripts/train.sh, scripts/run_train.py,
  diffuseq/config.json, sample_seq2seq.py;
* ZetangForward/Bridge_Gap_Diffusion @ e16c6a8: README.md (training and inference), scripts/run_train.py,
  diffuseq/config.json, train_util.py.

Every flag of ours is accounted for: equal to the released value, a documented difference (its row tag must be in
docs/differences.md, and the preset must still hold the documented value), or a setting the release has no
counterpart of (pinned here too). Every released flag is read by the transcription or listed with the reason it
has no counterpart. So a preset edit that changes any flag fails here until the transcription or the
documentation says why.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = open(os.path.join(ROOT, "docs", "differences.md"), encoding="utf-8").read()
# the decoders' sampler options (issue 21), unset in every released command line: ours, released or ddpm
NO_SAMPLER_OPTIONS = {"order": None, "threshold": None, "remask": None, "eta": None, "solver": None}


# ---------------------------------------------------------------------------- running a preset dry
def dry_run(script: str, *args: str, cwd: str, ngpu: int = 1) -> dict[str, list[list[str]]]:
    """{script name: [argument lists]} of the train.py / decoder / compute_elbo.py lines a preset prints."""
    env = dict(os.environ, DRY_RUN="1", NGPU=str(ngpu), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, list[list[str]]] = {}
    for line in proc.stdout.splitlines():
        words = shlex.split(line)
        for name in ("train.py", "predict.py", "predict_downstream_condition.py", "compute_elbo.py"):
            if name in words:
                out.setdefault(name, []).append(words[words.index(name) + 1:])
    return out


def train_flags(argv: list[str], ngpu: int) -> dict:
    """train.py's flags after every default (its own parser; the defaults that depend on other flags resolved as
    train.py does: the gaussian shape, --simi_penalty auto), plus examples_per_step over ``ngpu`` processes."""
    import dataclasses

    from runtime.config import TrainConfig, build_parser, from_args
    cfg = from_args(build_parser(TrainConfig).parse_args(argv))
    cfg.resolve_defaults()
    ns = dataclasses.asdict(cfg)
    ns["examples_per_step"] = ns["batch_size"] * ns["accumulation_steps"] * ngpu
    return ns


def decoder_flags(script: str, argv: list[str]) -> dict:
    if script == "predict.py":
        import predict as mod
    else:
        import predict_downstream_condition as mod
    return vars(mod.parse_args(argv))


class Reads:
    """A released namespace that records which of its flags the transcription reads."""

    def __init__(self, ns: argparse.Namespace):
        self._ns, self.read = vars(ns), set()

    def __getattr__(self, name):
        if name.startswith("_") or name == "read":
            raise AttributeError(name)
        self.read.add(name)
        return self._ns[name]


def account(ours: dict, released: dict, differences: dict, ours_only: dict, ignore=("out_dir", "name", "checkpoint")):
    """Every flag of ``ours`` is equal to ``released``, or a documented difference ``{flag: (our value, row
    tag)}``, or ``ours_only`` (pinned); returns the list of problems (empty when the preset is as documented)."""
    problems = []
    for k, v in ours.items():
        if k in ignore:
            continue
        if k in differences:
            want, tag = differences[k]
            if v != want:
                problems.append(f"--{k}: the preset has {v!r}, the documented difference {want!r}")
            if tag not in DOC:
                problems.append(f"--{k}: no row {tag!r} in docs/differences.md")
            if k in released and released[k] == v:
                problems.append(f"--{k}: listed as a difference but equal to the released {v!r}")
        elif k in released:
            if v != released[k]:
                problems.append(f"--{k}: the preset has {v!r}, the released run {released[k]!r}")
        elif k in ours_only:
            if v != ours_only[k]:
                problems.append(f"--{k}: the preset has {v!r}, pinned as ours {ours_only[k]!r}")
        else:
            problems.append(f"--{k} ({v!r}) is not accounted for")
    for k in set(released) | set(differences) | set(ours_only):
        if k not in ours:
            problems.append(f"{k}: in the transcription but not a flag of ours")
    for k in set(released) & set(ours_only):
        problems.append(f"{k}: both released and ours-only")
    return problems


def unread(reads: Reads, reasons: dict) -> set:
    """Released flags neither read by the transcription nor given a reason (must be empty)."""
    return set(reads._ns) - reads.read - set(reasons)


# ---------------------------------------------------------------------------- DiffusionBERT, unconditional
def ddp_main_parser() -> argparse.ArgumentParser:
    """DDP_main.py parse_args, transcribed (type=bool included)."""
    p = argparse.ArgumentParser()
    p.add_argument("--model_name_or_path", default='bert-base-uncased', type=str)
    p.add_argument("--task_name", default='lm1b', type=str)
    p.add_argument("--lr", default=5e-4, type=float)
    p.add_argument("--epochs", default=3, type=int)
    p.add_argument("--batch_size", default=64, type=int)
    p.add_argument("--word_freq_lambda", default=0.3, type=float)
    p.add_argument("--num_steps", default=2048, type=int)
    p.add_argument("--eval_step_size", default=4, type=int)
    p.add_argument("--dev_size", default=5e-4, type=float)
    p.add_argument("--hybrid_lambda", default=1e-2, type=float)
    p.add_argument("--eval_steps", default=15000, type=int)
    p.add_argument("--seed", default=42, type=int)
    p.add_argument("--logging_steps", default=1000, type=int)
    p.add_argument('--predict_x0', default=True, type=bool)
    p.add_argument("--load_step", default=-1, type=int)
    p.add_argument("--sample_strategy", default='Categorical', type=str)
    p.add_argument("--schedule", default='mutual', type=str)
    p.add_argument("--from_scratch", default=False, type=bool)
    p.add_argument("--timestep", default='none', type=str)
    return p


# run.sh: python -m torch.distributed.launch --nproc_per_node 4 ... DDP_main.py
RUN_SH = "--lr 5e-5 --batch_size 128 --timestep 'layerwise' --from_scratch false"
RUN_SH_NPROC = 4
LM1B_TRAIN_ROWS = 30_301_028  # datasets' lm1b train split, before DDP_main.py's train_test_split(test_size=dev_size)

DDP_MAIN_NO_COUNTERPART = {
    "task_name": "DiffusionLoader.my_load is called with 'lm1b' whatever it says",
    "predict_x0": "True: the network predicts x0 (ours always does)",
    "load_step": "-1: no resume (ours: --resume)",
    "sample_strategy": "Categorical: independent masking, ours",
    "dev_size": "a 5e-4 share of train as dev set; ours evaluates --eval_examples of the carved-off valid split (row)",
}


def ddp_main_as_ours(a: Reads, nproc: int, train_rows: int) -> dict:
    """The released DDP_main.py run in our flags."""
    dev = math.ceil(a.dev_size * train_rows)  # datasets' train_test_split rounds the test share up
    per_rank = math.ceil((train_rows - dev) / nproc)  # DistributedSampler pads to a multiple of the ranks
    return {
        "task": "lm", "process": "absorbing", "dataset": "lm1b",
        "model_name_or_path": a.model_name_or_path,
        "from_scratch": a.from_scratch,
        "time_conditioning": a.timestep,
        # dataloader.py truncates at 128 wordpieces without [CLS]/[SEP]; denoise_fn adds both
        "max_len": 128 + 2,
        "num_steps": a.num_steps,
        # MaskDiffusion adds word_freq_lambda * sin(pi t / T) * (f - fbar) to the mutual schedule: the spindle
        "schedule": "spindle" if a.schedule == "mutual" and a.word_freq_lambda > 0 else a.schedule,
        "spindle_form": "released",
        "word_freq_lambda": a.word_freq_lambda,
        "hybrid_lambda": a.hybrid_lambda,
        "loss_weighting": "released",   # compute_kl_reverse_process(...)['loss'] / batch_size
        "lr": a.lr,
        "lr_schedule": "ddp_main", "warmup_steps": 10000,  # LambdaLR(n / 10000 + 1e-3 ... 100 / sqrt(n))
        "grad_clip": 0.0, "grad_clip_value": 5.0,          # clip_grad_value_(..., 5); no norm clipping
        "weight_decay": 0.01,                               # torch.optim.AdamW's default
        "examples_per_step": a.batch_size * nproc,
        "max_steps": a.epochs * math.ceil(per_rank / a.batch_size),
        "eval_every": a.eval_steps,
        "eval_steps": a.num_steps // a.eval_step_size,
        "log_every": a.logging_steps,
        "seed": a.seed,
        "num_workers": 4,                                   # DataLoader(num_workers=4)
        "dropout": None,                                    # the pretrained config's own (0.1)
    }


# flags of ours with no released counterpart, pinned (absorbing lm presets)
GAUSSIAN_DEFAULTS = {"emb_dim": None, "hidden_size": None, "num_layers": None, "num_heads": None,  # the model's own
                     "timestep_sampler": "lossaware", "ema_rate": 0.9999, "loss_average": "all", "post_train": None,
                     "simi_penalty": "none", "simi_lambda": -2.0, "simi_noise": 0.05, "simi_maps": "released"}
PLUMBING = {"data_files": None, "data_dir": "data", "skip_bad_lines": False, "word_freq_file": None, "compile": False,
            "keep_last": 0, "max_bad_steps": 10, "log_dir": "logs", "resume": None, "device": "auto",
            "overwrite": False, "decay": "linear", "save_training_state": "last",  # --decay: --lr_schedule warmup only
            "objective": "discrete"}  # the released T-step objective (MDLM's continuous-time one is --objective mdlm)

# the seq2seq canvas flags, unused by the lm presets (their defaults)
LM_SEQ2SEQ_FLAGS = {"canvas": "ours", "pad_to": "auto", "truncation": "auto"}

COMMON_DIFFS = {
    "low_discrepancy": (False, "`DDP_main.py` `sample_t`"),
    "bf16": (True, "bf16 autocast"),
}


def test_released_run_sh_parses_from_scratch_false_as_true():
    a = ddp_main_parser().parse_args(shlex.split(RUN_SH))
    assert a.from_scratch is True and a.timestep == "layerwise" and a.schedule == "mutual"


def check_lm(preset: str, tmp_path, released: dict, reads: Reads, diffs: dict, ours_only: dict):
    for ngpu in (1, 4):
        cmds = dry_run("run.sh", preset, cwd=str(tmp_path), ngpu=ngpu)
        ours = train_flags(cmds["train.py"][0], ngpu)
        only = {**ours_only, "batch_size": ours_only["batch_size"],
                "accumulation_steps": -(-ours_only["accumulation_steps"] // ngpu)}
        assert account(ours, released, diffs, only) == [], f"NGPU={ngpu}"
    assert unread(reads, DDP_MAIN_NO_COUNTERPART) == set()
    return cmds


def test_lm1b_released_is_the_released_run_sh(tmp_path):
    reads = Reads(ddp_main_parser().parse_args(shlex.split(RUN_SH)))
    released = ddp_main_as_ours(reads, RUN_SH_NPROC, LM1B_TRAIN_ROWS)
    assert released["max_steps"] == 177_459 and released["examples_per_step"] == 512
    diffs = {**COMMON_DIFFS, "eval_examples": (2000, "dev ELBO: 2,000 lines of the carved-off valid split")}
    ours_only = {**GAUSSIAN_DEFAULTS, **PLUMBING, **LM_SEQ2SEQ_FLAGS, "batch_size": 128, "accumulation_steps": 4,
                 "save_every": 15000}
    cmds = check_lm("lm1b-released", tmp_path, released, reads, diffs, ours_only)
    check_predict(cmds, num_samples=2 * 32, batch_size=32, diffs={})


def test_lm1b_is_the_paper_with_the_released_code_elsewhere(tmp_path):
    # The paper (Table 2 and its training details, as docs/algorithms.md and /work/shared/ALGORITHMS.md quote them):
    # TAD on a pretrained bert-base-uncased, T = 2048, spindle 0.3, 64 wordpieces, lr 3e-6 with 10k warm-up steps,
    # batch 32 on 4 GPUs, about 1.9M steps; DDP_main.py with those flags for everything the paper does not state.
    reads = Reads(ddp_main_parser().parse_args(["--lr", "3e-6", "--batch_size", "32"]))
    released = ddp_main_as_ours(reads, RUN_SH_NPROC, LM1B_TRAIN_ROWS)
    paper = {"max_len": 64, "max_steps": 1_900_000}
    diffs = {**COMMON_DIFFS, "eval_examples": (2000, "dev ELBO: 2,000 lines of the carved-off valid split"),
             "eval_steps": (128, "dev ELBO: 2,000 lines of the carved-off valid split"),
             **{k: (v, "`lm1b`: the paper's setup") for k, v in paper.items()}}
    ours_only = {**GAUSSIAN_DEFAULTS, **PLUMBING, **LM_SEQ2SEQ_FLAGS, "batch_size": 32, "accumulation_steps": 4,
                 "save_every": 5000}
    cmds = check_lm("lm1b", tmp_path, released, reads, diffs, ours_only)
    check_predict(cmds, num_samples=1000, batch_size=250, diffs={"num_samples": (1000, "`lm1b`: the paper's setup")})


# predict.py: argparse --topk 30 --step_size 2; constants num_steps 512, temperature 0.1, shape [32, 32],
# iteration 2, no top-p (discrete_diffusion_predict_fn's topp=-1.0)
def check_predict(cmds, num_samples: int, batch_size: int, diffs: dict):
    released = {"sampler": "released", "steps": 512 // 2, "topk": 30, "temperature": 0.1, "length": "32",
                "top_p": 1.0, "num_samples": 2 * 32, "decode_respacing": None, "weights": "ema",
                "max_len": None, "prompt": None, "template": None, "template_file": None}
    ours_only = {"batch_size": batch_size, "seed": 42, "out_dir": "generation_results", "overwrite": False,
                 "resume": False, "device": "auto", "block_size": None, **NO_SAMPLER_OPTIONS}
    cached, uncached = cmds["predict.py"]
    assert account(decoder_flags("predict.py", cached), released, diffs, {**ours_only, "no_cache": False}) == []
    assert account(decoder_flags("predict.py", uncached), released, diffs, {**ours_only, "no_cache": True}) == []


# ---------------------------------------------------------------------------- DiffusionBERT, seq2seq
def ddp_main_conditional_parser() -> argparse.ArgumentParser:
    """DDP_main_conditional.py parse_args, transcribed."""
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", default=200, type=int)
    p.add_argument("--model_name_or_path", default='roberta-base', type=str)
    p.add_argument("--task_name", default='qqp', type=str)
    p.add_argument("--lr", default=5e-5, type=float)
    p.add_argument("--batch_size", default=64, type=int)
    p.add_argument("--word_freq_lambda", default=0.0, type=float)
    p.add_argument("--num_steps", default=2000, type=int)
    p.add_argument("--eval_step_size", default=80, type=int)
    p.add_argument("--accumulation_steps", default=4, type=int)
    p.add_argument("--hybrid_lambda", default=3e-4, type=float)
    p.add_argument("--eval_steps", default=2000, type=int)
    p.add_argument("--seed", default=42, type=int)
    p.add_argument("--device", default='cuda:0', type=str)
    p.add_argument("--logging_steps", default=200, type=int)
    p.add_argument("--save_steps", default=2000, type=int)
    p.add_argument('--predict_x0', default=True, type=bool)
    p.add_argument("--load_step", default=-1, type=int)
    p.add_argument("--sample_strategy", default='Categorical', type=str)
    p.add_argument("--schedule", default='mutual', type=str)
    p.add_argument("--from_scratch", default=False, type=bool)
    p.add_argument("--timestep", default='none', type=str)
    return p


# run_condition.sh: python -m torch.distributed.launch --nproc_per_node 4 ... DDP_main_conditional.py
RUN_CONDITION_SH = "--lr 5e-5 --batch_size 64 --task_name 'QT' --eval_steps 50"
TASK_NAMES = {"qqp": "qqp", "quasar_t": "QT"}  # the two loaders in its Dataloaders dict

CONDITIONAL_NO_COUNTERPART = {
    "task_name": "the dataset: ours is the preset's (--dataset); the release has loaders for qqp and QT only",
    "predict_x0": "True, ours", "load_step": "-1, no resume", "sample_strategy": "Categorical, ours",
    "device": "unused (LOCAL_RANK decides)",
    "eval_steps": "50 micro-batches = 12.5 optimizer steps: --eval_every (row 'dev ELBO every 50 micro-batches')", "save_steps": "unused (the periodic save is commented out)",
    "word_freq_lambda": "0.0 with a zero word_freq: the mutual schedule (read through --schedule)",
}


def conditional_as_ours(a: Reads, nproc: int, train_rows: int) -> dict:
    """The released DDP_main_conditional.py run in our flags (the evaluation and logging counters of the
    release count micro-batches; ours count optimizer steps)."""
    micro_per_epoch = math.ceil(math.ceil(train_rows / nproc) / a.batch_size)
    return {
        "task": "seq2seq", "process": "absorbing",
        "model_name_or_path": a.model_name_or_path,
        "from_scratch": a.from_scratch, "time_conditioning": a.timestep,
        "num_steps": a.num_steps,
        "schedule": a.schedule if a.word_freq_lambda == 0 else "spindle",
        "hybrid_lambda": a.hybrid_lambda,
        "loss_weighting": "released_conditional",  # compute_kl_reverse_process(...)['loss'], no division
        "lr": a.lr,
        "lr_schedule": "ddp_main_conditional", "warmup_steps": 10000,  # LinearLR(optimizer, total_iters=10000)
        "grad_clip": 0.0, "grad_clip_value": 5.0, "weight_decay": 0.01,
        "batch_size": a.batch_size,
        "examples_per_step": a.batch_size * nproc * a.accumulation_steps,
        "max_steps": a.epochs * micro_per_epoch // a.accumulation_steps,
        "eval_steps": a.num_steps // a.eval_step_size,
        "log_every": a.logging_steps // a.accumulation_steps,
        "seed": a.seed, "num_workers": 4, "dropout": None,
        "max_len": 128,  # convert_to_features: max_length=128 (each side; see the canvas rows)
        "canvas": "released",  # collate_fn: [CLS] source target [SEP], the source through add_prompt
        "pad_to": "longest",   # collate_fn: pad_sequence
    }


CONDITIONAL_DIFFS = {
    **COMMON_DIFFS,
    "model_name_or_path": ("bert-base-uncased", "`run_condition.sh` (conditional)"),
    "eval_every": (1000, "dev ELBO every 50 micro-batches"),
    "eval_examples": (1000, "dev ELBO every 50 micro-batches"),
    "truncation": ("ours", "`dataloader.py` `convert_to_features`"),
}


@pytest.mark.parametrize("preset", ["qqp", "wiki_auto", "quasar_t", "commonsense_conversation", "folder"])
def test_conditional_presets_are_the_released_run_condition_sh(preset, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = 1000 + 37
    (folder / "train.jsonl").write_text('{"src": "a", "trg": "b"}\n' * rows)
    reads = Reads(ddp_main_conditional_parser().parse_args(shlex.split(RUN_CONDITION_SH)))
    released = conditional_as_ours(reads, 4, rows)
    assert released["examples_per_step"] == 1024 and released["max_steps"] == 200 * 5 // 4
    ours_only = {**GAUSSIAN_DEFAULTS, **PLUMBING, "data_files": str(folder), "dataset": preset,
                 "word_freq_lambda": 0.3, "spindle_form": "released", "save_every": 1000}
    for ngpu in (1, 4):
        cmds = dry_run("run_condition.sh", preset, str(folder), cwd=str(tmp_path), ngpu=ngpu)
        ours = train_flags(cmds["train.py"][0], ngpu)
        only = {**ours_only, "accumulation_steps": 16 // ngpu}
        assert account(ours, released, CONDITIONAL_DIFFS, only) == [], f"NGPU={ngpu}"
    assert unread(reads, CONDITIONAL_NO_COUNTERPART) == set()

    # predict_downstream_condition.py: --topk 15 --step_size 10 --MBR_size 3 --seq_len 128; num_steps 2000,
    # temperature 1.0, batch_size 32, discrete_diffusion_predict_fn(mask_token_id=103, topp=-1.0)
    decode = decoder_flags("predict_downstream_condition.py", cmds["predict_downstream_condition.py"][0])
    released_decode = {"sampler": "released", "steps": 2000 // 10, "topk": 15, "temperature": 1.0, "top_p": 1.0,
                       "mbr_size": 3, "split": "test", "num_examples": 0,
                       # 103 is bert-base-uncased's [MASK]: our default start (see the RoBERTa row)
                       "start_id": None}
    ours_decode = {"batch_size": 128, "seed": 42, "decode_respacing": None, "weights": "ema", "no_cache": False,
                   "mbr_only": None, "out_dir": "generation_results", "overwrite": False, "resume": False,
                   "device": "auto", "skip_bad_lines": False, **NO_SAMPLER_OPTIONS}
    assert account(decode, released_decode, {}, ours_decode) == []


# ---------------------------------------------------------------------------- DiffuSeq and Tang et al.
def diffuseq_run_train_parser(tang: bool = False) -> argparse.ArgumentParser:
    """scripts/run_train.py's parser (DiffuSeq 8bfafcb; Tang et al.'s adds the penalty flags), transcribed."""
    p = argparse.ArgumentParser()
    p.add_argument('--dataset', type=str, default='')
    p.add_argument('--data_dir', type=str, default='')
    p.add_argument('--noise_schedule', type=str, default='cosine')
    p.add_argument('--diff_steps', type=int, default=4000)
    p.add_argument('--schedule_sampler', type=str, default='uniform')
    p.add_argument('--seq_len', type=int, default=128)
    p.add_argument('--hidden_t_dim', type=int, default=128)
    p.add_argument('--hidden_dim', type=int, default=128)
    p.add_argument('--learning_steps', type=int, default=40000)
    p.add_argument('--save_interval', type=int, default=10000)
    p.add_argument('--resume_checkpoint', type=str, default='none')
    p.add_argument('--lr', type=float, default=1e-04)
    p.add_argument('--bsz', type=int, default=64)
    p.add_argument('--microbatch', type=int, default=64)
    p.add_argument('--seed', type=int, default=101)
    p.add_argument('--config_name', type=str, default='bert-base-uncased')
    p.add_argument('--vocab', type=str, default='bert')
    p.add_argument('--use_plm_init', type=str, default='no')
    p.add_argument('--notes', type=str, default='-')
    p.add_argument('--app', type=str, default='')
    if tang:
        p.add_argument('--use_fp16', action='store_true')
        p.add_argument('--simi_lambda', type=float, default=0.01)
        p.add_argument('--simi_step', type=int, default=10)
        p.add_argument('--simi_penalty', type=str, default="cosine")
        p.add_argument('--near_step', type=int, default=0)
        p.add_argument('--near_lambda', type=float, default=0)
        p.add_argument('--far_step', type=int, default=0)
        p.add_argument('--far_lambda', type=float, default=0)
        p.add_argument('--simi_noise', type=float, default=0.05)
    return p


# diffuseq/config.json (DiffuSeq 8bfafcb; Tang's fork adds the penalty keys), the defaults of train.py's parser
CONFIG_JSON = {"lr": 0.0001, "batch_size": 2048, "microbatch": 64, "learning_steps": 320000, "log_interval": 20,
               "save_interval": 40000, "eval_interval": 1000, "ema_rate": "0.9999", "resume_checkpoint": "none",
               "schedule_sampler": "lossaware", "diffusion_steps": 2000, "noise_schedule": "sqrt",
               "timestep_respacing": "", "vocab": "bert", "use_plm_init": "no", "vocab_size": 0,
               "config_name": "huggingface-config", "notes": "folder-notes", "data_dir": "data-dir",
               "dataset": "dataset-name", "checkpoint_path": "checkpoint-path", "seq_len": 128, "hidden_t_dim": 128,
               "hidden_dim": 128, "dropout": 0.1, "use_fp16": False, "fp16_scale_growth": 0.001, "seed": 102,
               "gradient_clipping": -1.0, "weight_decay": 0.0, "learn_sigma": False, "use_kl": False,
               "predict_xstart": True, "rescale_timesteps": True, "rescale_learned_sigmas": False,
               "sigma_small": False, "emb_scale_factor": 1.0}
TANG_CONFIG_EXTRA = {"log_interval": 5, "save_interval": 100, "eval_interval": 5000, "simi_penalty": "",
                     "simi_lambda": 0.01, "simi_step": 10, "near_step": 0, "far_step": 0, "near_lambda": 0.0,
                     "far_lambda": 0.0, "simi_noise": 0.05}


def train_py_args(a: argparse.Namespace, tang: bool) -> dict:
    """run_train.py's COMMANDLINE to train.py over config.json: the effective training arguments."""
    passed = {"dataset": a.dataset, "data_dir": a.data_dir, "vocab": a.vocab, "use_plm_init": a.use_plm_init,
              "lr": a.lr, "batch_size": a.bsz, "microbatch": a.microbatch, "diffusion_steps": a.diff_steps,
              "noise_schedule": a.noise_schedule, "schedule_sampler": a.schedule_sampler,
              "resume_checkpoint": a.resume_checkpoint, "seq_len": a.seq_len, "hidden_t_dim": a.hidden_t_dim,
              "seed": a.seed, "hidden_dim": a.hidden_dim, "learning_steps": a.learning_steps,
              "save_interval": a.save_interval, "config_name": a.config_name, "notes": a.notes}
    if tang:
        passed.update(simi_lambda=a.simi_lambda, simi_step=a.simi_step, simi_penalty=a.simi_penalty,
                      near_lambda=a.near_lambda, near_step=a.near_step, far_lambda=a.far_lambda,
                      far_step=a.far_step, simi_noise=a.simi_noise)
    return {**CONFIG_JSON, **(TANG_CONFIG_EXTRA if tang else {}), **passed}


DIFFUSEQ_NO_COUNTERPART = {
    "vocab_size": "set from the tokenizer", "config_name": "read (bert-base-uncased: the encoder's size)",
    "notes": "a folder name", "data_dir": "--data_files", "checkpoint_path": "--out_dir", "dataset": "--dataset",
    "log_interval": "logging", "save_interval": "checkpoints", "eval_interval": "dev loss",
    "fp16_scale_growth": "fp16 only", "timestep_respacing": "'' in training: the full chain",
    "learn_sigma": "False: fixed variances (ours)", "use_kl": "False: the MSE loss (ours)",
    "predict_xstart": "True: x0-prediction (ours)", "rescale_timesteps": "True: t scaled to [0, 1000) (ours)",
    "rescale_learned_sigmas": "unused without learned sigmas", "sigma_small": "False: ours",
    "emb_scale_factor": "1.0: ours", "hidden_t_dim": "128: our time embedding",
    "resume_checkpoint": "none (DiffuSeq); the base run (Tang, read as --post_train)",
    "vocab": "bert: bert-base-uncased's vocabulary (read with config_name)",
    "use_plm_init": "no: trained from scratch, as ours", "dropout": "0.1, our gaussian default (--dropout None)",
    "simi_step": "unused by l2_noise_random", "near_step": "0: off", "near_lambda": "0: off",
    "far_step": "0: off", "far_lambda": "0: off",
}


def diffuseq_as_ours(t: Reads) -> dict:
    """The effective DiffuSeq train.py arguments in our flags. ``batch_size`` examples on every rank; before
    82a2c40 (the paper's code) every rank draws the same batch (no DistributedSampler, one seed), so a step
    has batch_size distinct examples on any number of GPUs."""
    assert t.vocab == "bert" and t.config_name == "bert-base-uncased" and t.use_plm_init == "no"
    assert t.dropout == 0.1 and not t.learn_sigma and t.predict_xstart and t.timestep_respacing == ""
    return {
        "task": "seq2seq", "process": "gaussian", "model_name_or_path": "bert-base-uncased",
        "hidden_size": 768, "num_layers": 12, "num_heads": 12,
        "emb_dim": t.hidden_dim, "max_len": t.seq_len, "num_steps": t.diffusion_steps,
        "schedule": t.noise_schedule, "timestep_sampler": t.schedule_sampler,
        "lr": t.lr, "weight_decay": t.weight_decay, "grad_clip": 0.0 if t.gradient_clipping <= 0 else t.gradient_clipping,
        "ema_rate": float(t.ema_rate), "seed": t.seed,
        "batch_size": t.microbatch, "examples_per_step": t.batch_size,
        "loss_average": "all",  # mean_flat over the canvas
        "bf16": t.use_fp16,     # fp32 (documented below)
        "pad_to": "max_len",    # pad_function: every row seq_len long
        "truncation": "diffuseq",  # merge_and_mask: the longer side loses its last word
    }


# the README's line per task (learning steps), 4 GPUs for qqp and qg
DIFFUSEQ_TASK_STEPS = {"qqp": 50000, "quasar_t": 40000, "commonsense_conversation": 140000, "wiki_auto": 80000,
                       "folder": 50000}
TRAIN_SH = ("--diff_steps 2000 --lr 0.0001 --learning_steps 50000 --save_interval 10000 --seed 102 "
            "--noise_schedule sqrt --hidden_dim 128 --bsz 2048 --dataset qqp --data_dir {path-to-datasets} "
            "--vocab bert --seq_len 128 --schedule_sampler lossaware --notes test-qqp")

DIFFUSEQ_OURS = {**PLUMBING, "from_scratch": False, "time_conditioning": "none", "spindle_form": "released",
                 "word_freq_lambda": 0.3, "hybrid_lambda": 0.01, "loss_weighting": "elbo", "low_discrepancy": False,
                 "post_train": None, "simi_penalty": "none", "simi_lambda": -2.0, "simi_noise": 0.05,
                 "simi_maps": "released", "dropout": None, "grad_clip_value": 0.0, "eval_every": 2000,
                 "eval_examples": 1000, "eval_steps": 64, "save_every": 2000, "log_every": 50, "num_workers": 4}
GAUSSIAN_DIFFS = {"bf16": (True, "bf16 autocast"),
                  "canvas": ("ours", "DiffuSeq canvas `[CLS] x [SEP] [SEP] [CLS] y [SEP] [PAD]...`")}


@pytest.mark.parametrize("task", sorted(DIFFUSEQ_TASK_STEPS))
def test_diffuseq_presets_are_the_released_train_sh(task, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    a = diffuseq_run_train_parser().parse_args(shlex.split(TRAIN_SH))
    reads = Reads(argparse.Namespace(**train_py_args(a, tang=False)))
    released = {**diffuseq_as_ours(reads), "max_steps": DIFFUSEQ_TASK_STEPS[task],
                "lr_schedule": "warmup", "warmup_steps": 0, "decay": "linear"}  # _anneal_lr: lr (1 - step / steps)
    only = {k: v for k, v in DIFFUSEQ_OURS.items() if k != "decay"}
    for ngpu in (1, 4):
        cmds = dry_run("run_condition.sh", "diffuseq", task, str(folder), cwd=str(tmp_path), ngpu=ngpu)
        ours = train_flags(cmds["train.py"][0], ngpu)
        pinned = {**only, "dataset": task, "data_files": str(folder), "accumulation_steps": 32 // ngpu}
        assert account(ours, released, GAUSSIAN_DIFFS, pinned) == [], f"NGPU={ngpu}"
    assert unread(reads, {**DIFFUSEQ_NO_COUNTERPART, "learning_steps": "per task: the README"}) == set()
    # sample_seq2seq.py --step 2000 (= diffusion_steps: p_sample_loop, the full chain); MBR over 10 seeds
    decode = decoder_flags("predict_downstream_condition.py", cmds["predict_downstream_condition.py"][0])
    assert account(decode, {"decode_respacing": "full", "weights": "ema", "mbr_size": 10, "split": "test",
                            "num_examples": 0, "top_p": 1.0},
                   {}, {"batch_size": 256, "seed": 42, "sampler": "ours", "steps": None, "topk": 0,
                        "temperature": 1.0, "start_id": None, "no_cache": False, "mbr_only": None,
                        "out_dir": "generation_results", "overwrite": False, "resume": False, "device": "auto",
                        "skip_bad_lines": False, **NO_SAMPLER_OPTIONS}) == []


# Tang et al.'s README, "Training" (4 GPUs) and "Inference"
TANG_TRAIN = ("--diff_steps 2000 --microbatch 100 --lr 0.0001 --learning_steps 320000 --save_interval 2500 "
              "--seed 109 --noise_schedule sqrt --hidden_dim 128 --bsz 100 --dataset qqp --data_dir datasets/QQP "
              "--vocab bert --seq_len 128 --simi_penalty l2_noise_random --simi_lambda -2 --simi_step 10 "
              "--simi_noise 0.05 --resume_checkpoint /path/to/checkpoint --schedule_sampler lossaware --notes qqp")
TANG_DECODE = "--step 2000 --batch_size 16 --seed2 10 --split test --decode_respacing adp_20"


def test_diffuseq_post_is_tang_et_al_released_post_training(tmp_path):
    base_step = 50000  # DiffuSeq's qqp run (train.sh --learning_steps 50000)
    base = tmp_path / "outputs" / "diffuseq-qqp-20260101-000000"
    (base / "checkpoints" / "best").mkdir(parents=True)
    (base / "checkpoints" / "best" / "run_config.json").write_text(f'{{"step": {base_step}, "config": {{}}}}')
    a = diffuseq_run_train_parser(tang=True).parse_args(shlex.split(TANG_TRAIN))
    reads = Reads(argparse.Namespace(**train_py_args(a, tang=True)))
    t = reads
    released = {
        "lr": t.lr, "seed": t.seed, "weight_decay": t.weight_decay, "ema_rate": float(t.ema_rate),
        "grad_clip": 0.0 if t.gradient_clipping <= 0 else t.gradient_clipping,
        "batch_size": t.microbatch, "examples_per_step": t.batch_size,  # every rank draws the same batch
        # run_loop: while step + resume_step < learning_steps, resume_step parsed from the checkpoint's name
        "max_steps": t.learning_steps - base_step,
        # optimize_normal never calls _anneal_lr: constant
        "lr_schedule": "warmup", "warmup_steps": 0, "decay": "constant",
        "simi_penalty": t.simi_penalty, "simi_lambda": t.simi_lambda, "simi_noise": t.simi_noise,
        "simi_maps": "released", "loss_average": "all", "bf16": t.use_fp16,
        "timestep_sampler": t.schedule_sampler, "post_train": str(base),
    }
    for k in ("diffusion_steps", "noise_schedule", "schedule_sampler", "hidden_dim", "seq_len"):
        getattr(t, k)  # the network and chain: inherited from the base run (TrainConfig.POST_TRAIN_SAME)
    from runtime.config import TrainConfig
    inherited = {k: getattr(TrainConfig(), k) for k in TrainConfig.POST_TRAIN_SAME}
    pinned = {**{k: v for k, v in DIFFUSEQ_OURS.items() if k not in released and k not in inherited},
              **inherited, "eval_every": 2500, "save_every": 2500,
              "accumulation_steps": 1, "pad_to": "auto"}  # auto: max_len for gaussian
    for ngpu in (1, 4):
        cmds = dry_run("run_condition.sh", "diffuseq_post", str(base), cwd=str(tmp_path), ngpu=ngpu)
        ours = train_flags(cmds["train.py"][0], ngpu)
        if ngpu == 4:  # our ranks draw disjoint shards: 25 each, the same 100 distinct examples a step
            released_n = {**released, "batch_size": 25}
        else:
            released_n = released
        assert account(ours, released_n, GAUSSIAN_DIFFS, pinned) == [], f"NGPU={ngpu}"
    assert unread(reads, {**DIFFUSEQ_NO_COUNTERPART, "microbatch": "read"}) == set()
    # sample_seq2seq.py --step 2000 --decode_respacing adp_20, MBR over the seeds
    d = dict(zip(*[iter(shlex.split(TANG_DECODE))] * 2))
    assert d["--step"] == "2000" and d["--decode_respacing"] == "adp_20"
    decodes = [decoder_flags("predict_downstream_condition.py", c) for c in cmds["predict_downstream_condition.py"]]
    assert {x["decode_respacing"] for x in decodes} == {"full", "uniform_20", d["--decode_respacing"]}


# ---------------------------------------------------------------------------- the released optimisers
def test_lr_schedules_follow_the_released_schedulers():
    import torch
    from runtime.training import lr_lambda
    W = 10000
    f = lr_lambda(W, 10 ** 6, "linear", "ddp_main")
    released = lambda n: n / 10000. + 1e-3 if n < 10000 else 100. / math.sqrt(n)  # DDP_main.py, as written
    for n in (0, 1, 5000, 9999, 10000, 10001, 123456):
        assert f(n) == pytest.approx(released(n), rel=1e-12)
    # DDP_main_conditional.py: torch's own LinearLR(total_iters=10000) on a throwaway optimizer is the oracle
    W = 300  # any W: the closed form against torch's recursive LinearLR at every step
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = torch.optim.lr_scheduler.LinearLR(opt, total_iters=W)
    g = lr_lambda(W, 10 ** 6, "linear", "ddp_main_conditional")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scheduler stepped without optimizer steps
        for n in range(W + 3):
            assert g(n) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), n
            ref.step()


def test_grad_clip_value_clips_after_every_micro_batch(tmp_path, tiny_bert, tiny_pairs, monkeypatch):
    """train.py --grad_clip_value 5 --accumulation_steps 3: clip_grad_value_(params, 5) after each of the 3
    backward passes of both steps, as DDP_main_conditional.py does; and the logged learning rate follows
    LinearLR's 1/3 + 2/3 n / W (transcribed) under --lr_schedule ddp_main_conditional."""
    import json

    import torch
    from conftest import gauss_args, run_here
    calls = []
    real = torch.nn.utils.clip_grad_value_

    def spy(params, clip_value, **kw):
        params = list(params)
        calls.append((clip_value, sum(p.grad is not None for p in params)))
        return real(params, clip_value, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", spy)
    out = tmp_path / "run"
    W, lr = 4, 1e-3
    args = [a for a in gauss_args(tiny_bert, tiny_pairs, out, max_steps=2) if a not in ("--decay", "constant")]
    args[args.index("--warmup_steps") + 1] = str(W)
    args[args.index("--eval_every") + 1] = "0"  # only at the end
    proc = run_here(*args, "--accumulation_steps", "3", "--grad_clip", "0", "--grad_clip_value", "5",
                    "--lr_schedule", "ddp_main_conditional", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(calls) == 2 * 3 and all(v == 5 and n > 0 for v, n in calls)
    logged = {r["step"]: r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["split"] == "train"}
    # the lr logged after step k is the one step k + 1 will use: factor(k)
    assert logged == {k: pytest.approx(lr * (1 / 3 + 2 / 3 * min(k, W) / W)) for k in (1, 2)}


def test_start_id_keeps_the_chain_until_the_released_last_step():
    """--start_id: a start token that is not [MASK] never moves under the released step (its posterior puts
    1 - 1e-20 on the token itself); the released seq2seq sampler's last step then redraws every target
    position from p_hat. Hand-derived: the network is called once, on the canvas of start tokens."""
    import torch
    from diffusion.absorbing import AbsorbingDiffusion
    from diffusion.schedules import Mutual
    V, MASK, START, L = 12, 3, 7, 6
    seen = []

    def denoise(x, t, att, positions):
        seen.append(x.clone())
        logits = torch.zeros(x.shape[0], x.shape[1], V)
        logits[..., 9] = 10.0  # p_hat almost all on token 9
        return logits[positions] if positions is not None else logits

    diff = AbsorbingDiffusion(Mutual(), 20, MASK)
    x = torch.tensor([[1, 2, 0, 0, 0, 0]])
    noise = torch.tensor([[False, False, True, True, True, True]])
    out = diff.sample(denoise, x, noise, torch.ones_like(x), 10, topk=1, sampler="released", final_x0=True,
                      start_id=START, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 1 and seen[0].tolist() == [[1, 2, START, START, START, START]]
    assert out.x0.tolist() == [[1, 2, 9, 9, 9, 9]]
    # the default start is [MASK], which the chain unmasks step by step (more than one call)
    seen.clear()
    diff.sample(denoise, x, noise, torch.ones_like(x), 10, topk=1, sampler="released", final_x0=True,
                generator=torch.Generator().manual_seed(0))
    assert len(seen) > 1 and seen[0][0, 2:].eq(MASK).all()


def test_start_id_on_a_bert_checkpoint(seq2seq_run):
    """bert-base-uncased's [MASK] is 103, so the released start is ours there (the same strings); --start_id is
    refused without the released sampler and outside the vocabulary."""
    from common.errors import UserError
    from runtime.api import load
    m = load(str(seq2seq_run[1]))
    with pytest.raises(UserError, match="start_id"):
        m.decoding(steps=5, sampler="ours", start_id=103)
    with pytest.raises(UserError, match="start_id"):
        m.decoding(steps=5, sampler="released", start_id=len(m.tokenizer))
    src = m.source_ids(["in the beginning god created the heaven and the earth"])
    a = m.decode_batches(src, m.decoding(steps=5, sampler="released", topk=15), seed=3)
    b = m.decode_batches(src, m.decoding(steps=5, sampler="released", topk=15, start_id=103), seed=3)
    assert m.tokenizer.mask_token_id == 103 and a.texts == b.texts
