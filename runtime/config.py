"""The typed run configuration: one dataclass, the CLI generated from it, stored as JSON in every
checkpoint so that ``predict.py`` and ``compute_*.py`` need only ``--checkpoint``."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # task and process
    task: str = opt("lm", "lm: unconditional language modelling; seq2seq: conditional generation of trg from src",
                    choices=("lm", "seq2seq"))
    process: str = opt("absorbing", "absorbing: DiffusionBERT (discrete masking on a pretrained BERT); gaussian: "
                       "DiffuSeq (continuous diffusion on embeddings, transformer from scratch; --task seq2seq)",
                       choices=("absorbing", "gaussian"))
    # model
    model_name_or_path: str = opt("minilm", "hub id, local directory, or 'minilm' (offline all-MiniLM-L6-v2); "
                                  "with --process gaussian only its tokenizer is used")
    from_scratch: bool = opt(False, "same config, randomly initialised weights")
    time_conditioning: str = opt("none", "none (time-agnostic decoding), token, or layerwise",
                                 choices=("none", "token", "layerwise"))
    # data
    dataset: str = opt("bible", "lm: bible (offline default), text (--data_files) or lm1b (hub); seq2seq: bible "
                       "(KJV -> WEB verse pairs, offline) or a DiffuSeq task name (qqp, wiki_auto, quasar_t, "
                       "commonsense_conversation, folder) with --data_files")
    data_files: str | None = opt(None, "lm --dataset text: a text file or a folder with train.txt [valid.txt test.txt]; "
                                 "seq2seq: a DiffuSeq folder with train.jsonl valid.jsonl test.jsonl")
    data_dir: str = opt("data", "where the offline corpus is written")
    max_len: int = opt(64, "maximum wordpieces per example, [CLS] and [SEP] included")
    skip_bad_lines: bool = opt(False, "skip bad data lines (counted and logged per file) instead of stopping at "
                               "the first: seq2seq lines that are not one JSON object with non-empty string "
                               "src/trg, and lines that are not UTF-8")
    # diffusion
    num_steps: int = opt(2048, "T, the number of diffusion steps")
    schedule: str = opt("auto", "noise schedule; absorbing: mutual, cosine or spindle; gaussian: sqrt, linear or "
                        "cosine; auto: spindle for lm, mutual for seq2seq, sqrt for gaussian (as the originals)",
                        choices=("auto", "mutual", "cosine", "spindle", "sqrt", "linear"))
    spindle_form: str = opt("released", "spindle: released-code form or paper form (Eq. 10-12)",
                            choices=("released", "paper"))
    word_freq_lambda: float = opt(0.3, "spindle lambda")
    word_freq_file: str | None = opt(None, "token counts from word_freq.py (default word_freq/<tokenizer>__<dataset>.json)")
    hybrid_lambda: float = opt(0.01, "weight of the auxiliary cross-entropy term")
    loss_weighting: str = opt("elbo", "absorbing: elbo (T * KL per noised token + hybrid_lambda * mean CE over "
                              "masked tokens) or released (DiffusionBERT's DDP_main.py: KL summed over the noised "
                              "tokens with no factor T + hybrid_lambda * CE summed over all noised tokens, masked "
                              "or not, divided by the batch size); configs stored without it are elbo",
                              choices=("elbo", "released"))
    low_discrepancy: bool = opt(False, "stratify t across the batch (MDLM's low-discrepancy sampler)")
    # gaussian (DiffuSeq) model and training
    emb_dim: int = opt(128, "gaussian: word-embedding (diffusion) dimension D")
    hidden_size: int = opt(768, "gaussian: transformer hidden size")
    num_layers: int = opt(12, "gaussian: transformer layers")
    num_heads: int = opt(12, "gaussian: attention heads")
    timestep_sampler: str = opt("lossaware", "gaussian: how t is drawn in training", choices=("uniform", "lossaware"))
    ema_rate: float = opt(0.9999, "gaussian: EMA decay of the weights (decoding uses the EMA by default)")
    loss_average: str = opt("all", "gaussian: all: the MSE, L_T and rounding NLL are means over every position, "
                            "source and padding included (DiffuSeq as released: the source embeddings are trained "
                            "too); target: means over the target positions only", choices=("all", "target"))
    # post-training (Tang et al. 2023)
    post_train: str | None = opt(None, "gaussian: continue from this checkpoint (its EMA weights) with a fresh "
                                 "optimizer into --out_dir; the model and data flags must match it")
    simi_penalty: str = opt("none", "gaussian distance penalty: l2_noise_random (released), self_renoise "
                            "(the paper's figure) or none", choices=("none", "l2_noise_random", "self_renoise"))
    simi_lambda: float = opt(-2.0, "penalty weight, released convention: the loss is (mse + mse' + 2 nll + 2 L_T "
                             "- simi_lambda * penalty) / 2, so -2 is a weight of 1; must be <= 0")
    simi_noise: float = opt(0.05, "neighbourhood of t: |sqrt(1-abar_t') - sqrt(1-abar_t)| <= simi_noise")
    simi_maps: str = opt("released", "which t' the penalty draws: released (Tang et al.'s fill_noise_map: no step "
                         "above t near the top of the chain, none below t near 0) or complete (the whole "
                         "neighbourhood on both sides)", choices=("released", "complete"))
    # optimisation
    batch_size: int = opt(32, "examples per micro-batch per process")
    accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(5e-5, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(1000, "linear warm-up steps")
    decay: str = opt("linear", "learning-rate decay after warm-up", choices=("linear", "cosine", "constant"))
    max_steps: int = opt(10000, "optimizer steps")
    grad_clip: float = opt(1.0, "gradient-norm clipping (0: off)")
    dropout: float | None = opt(None, "override the model's dropout probabilities (gaussian default 0.1)")
    bf16: bool = opt(True, "bf16 autocast on CUDA (ignored on CPU)", bool_optional=True)
    compile: bool = opt(False, "torch.compile the network's encoder (worth it for long GPU runs; "
                        "bench.py --compile measures it)")
    # evaluation, checkpoints, logging
    eval_every: int = opt(1000, "dev-set ELBO every N optimizer steps (0: only at the end)")
    eval_examples: int = opt(512, "dev examples used for the ELBO (a fixed, seeded subset)")
    eval_steps: int = opt(64, "K, the ELBO grid size for the dev estimate")
    save_every: int = opt(1000, "write the last checkpoint every N optimizer steps")
    keep_last: int = opt(0, "also keep the K most recent checkpoints as checkpoints/step-<N> (0: only last/best)")
    max_bad_steps: int = opt(10, "stop (saving the last good state) after this many non-finite losses in a row")
    log_every: int = opt(10, "log training metrics every N optimizer steps")
    out_dir: str = opt("outputs/run", "run directory: checkpoints/best, checkpoints/last, metrics.jsonl")
    log_dir: str = opt("logs", "fitlog directory")
    resume: str | None = opt(None, "resume from a run directory or a checkpoint directory")
    seed: int = opt(42, "random seed")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    num_workers: int = opt(-1, "DataLoader workers (-1: 4 per process on CUDA, 0 on the CPU)")
    overwrite: bool = opt(False, "allow --out_dir to hold an earlier run (its checkpoints are replaced)")


def build_parser(cls=TrainConfig, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field; booleans are real switches."""
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_ = meta.pop("help", None)
        bool_optional = meta.pop("bool_optional", False)
        if f.type in ("bool", bool):
            action = argparse.BooleanOptionalAction if (bool_optional or f.default) else "store_true"
            p.add_argument(f"--{f.name}", action=action, default=f.default, help=help_)
            continue
        typ = {"int": int, "float": float, "str": str, "str | None": str, "float | None": float,
               "int | None": int}[f.type if isinstance(f.type, str) else f.type.__name__]
        p.add_argument(f"--{f.name}", type=typ, default=f.default, help=f"{help_} (default: {f.default})", **meta)
    return p


def from_args(ns: argparse.Namespace, cls=TrainConfig):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


# What a stored config written before a field existed did, where that differs from the field's default:
# such runs were trained that way, and a resumed or inspected run must say so.
LEGACY_VALUES = {"loss_average": "target", "simi_maps": "complete"}


def from_dict(d: dict, cls=TrainConfig):
    """Rebuild a config from stored JSON; unknown keys (from newer versions) are ignored, and missing
    keys take their ``LEGACY_VALUES`` (else their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    legacy = {k: v for k, v in LEGACY_VALUES.items() if k in names and k not in d} if cls is TrainConfig else {}
    return cls(**legacy, **{k: v for k, v in d.items() if k in names})
