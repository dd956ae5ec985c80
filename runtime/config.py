"""The typed run configuration: one dataclass, the CLI generated from it, stored as JSON in every
checkpoint so that ``predict.py`` and ``compute_*.py`` need only ``--checkpoint``."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

from common.cli import make_parser, other_steps
from common.errors import UserError, require_at_least_one
from conditional_data.pairs import CANVASES, TRUNCATIONS
from diffusion.absorbing import LOSS_WEIGHTINGS
from diffusion.mdlm import OBJECTIVES
from diffusion.gaussian import GAUSSIAN_SCHEDULES, LOSS_AVERAGES, NEIGHBOUR_MAPS
from diffusion.schedules import SCHEDULES, SPINDLE_FORMS
from diffusion.timestep_samplers import TIMESTEP_SAMPLERS
from models import TIME_CONDITIONING
from runtime.training import LR_DECAYS, LR_SCHEDULES
from textdata import lm

# The noise schedules of each process; its keys are the --process choices.
PROCESS_SCHEDULES = {"absorbing": SCHEDULES, "gaussian": GAUSSIAN_SCHEDULES, "autoregressive": ()}


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _or(names) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass
class TrainConfig:
    # task and process
    task: str = opt("lm", "lm: unconditional language modelling; seq2seq: conditional generation of trg from src",
                    choices=("lm", "seq2seq"))
    process: str = opt("absorbing", "absorbing: DiffusionBERT (discrete masking on a pretrained BERT); gaussian: "
                       "continuous diffusion on embeddings with a transformer from scratch: DiffuSeq with --task "
                       "seq2seq, Diffusion-LM with --task lm (a --max_len canvas, [SEP] and padding generated); "
                       "autoregressive: the absorbing run's BERT-shaped network with a causal mask, trained left to "
                       "right on next-token cross-entropy (an AR baseline of the same size; --task lm)",
                       choices=tuple(PROCESS_SCHEDULES))
    # model
    model_name_or_path: str = opt("minilm", "hub id, local directory, or 'minilm' (offline all-MiniLM-L6-v2); "
                                  "with --process gaussian only its tokenizer is used")
    from_scratch: bool = opt(False, "randomly initialised weights: the config of --model_name_or_path, or the shape "
                             "given by --hidden_size/--num_layers/--num_heads (e.g. a small absorbing model: "
                             "--from_scratch --hidden_size 128 --num_layers 2 --num_heads 2)")
    time_conditioning: str = opt("none", "none (time-agnostic decoding), token, or layerwise",
                                 choices=TIME_CONDITIONING)
    # data
    dataset: str = opt("bible", "lm: bible (offline default), text (--data_files) or lm1b (hub); seq2seq: bible "
                       "(KJV -> WEB verse pairs, offline) or a DiffuSeq task name (qqp, wiki_auto, quasar_t, "
                       "commonsense_conversation, folder) with --data_files")
    data_files: str | None = opt(None, "lm --dataset text: a text file or a folder with train.txt [valid.txt test.txt]; "
                                 "seq2seq: a DiffuSeq folder with train.jsonl valid.jsonl test.jsonl")
    data_dir: str = opt("data", "where the offline corpus is written")
    max_len: int = opt(64, "maximum wordpieces per example, [CLS] and [SEP] included (gaussian and seq2seq: "
                       "every row is a canvas of this length)")
    canvas: str = opt("ours", "seq2seq layout: ours ([CLS] src [SEP] trg [SEP]) or released (DiffusionBERT's "
                      "dataloader.py: [CLS] src trg [SEP], no separator, the source in the task's prompt text: qqp "
                      "'\"src\" is equal to \"', quasar_t ' Answer: src Question: ', wiki_auto, "
                      "commonsense_conversation; absorbing only)", choices=CANVASES)
    pad_to: str = opt("auto", "seq2seq batch width: max_len (every row a --max_len canvas, DiffuSeq's) or longest "
                      "(the batch's longest pair, DiffusionBERT's pad_sequence: faster, but the canvas positions past "
                      "a batch's longest pair are rarely trained, while the decoder's canvas is --max_len long); the "
                      "target region runs to the end of the row either way, so the model generates the padding; "
                      "auto: max_len", choices=("auto", "longest", "max_len"))
    truncation: str = opt("auto", "how a seq2seq pair longer than --max_len is cut: ours (the source first, never "
                          "below max_len // 2 tokens) or diffuseq (DiffuSeq's text_datasets.py: the longer side "
                          "loses its last word until the words fit max_len - 5); auto: diffuseq for gaussian, "
                          "ours for absorbing", choices=("auto", *TRUNCATIONS))
    skip_bad_lines: bool = opt(False, "skip bad data lines (counted and logged per file) instead of stopping at "
                               "the first: seq2seq lines that are not one JSON object with non-empty string "
                               "src/trg, and lines that are not UTF-8")
    # diffusion
    num_steps: int = opt(2048, f"T, the number of diffusion steps; {other_steps('num_steps')}")
    schedule: str = opt("auto", f"noise schedule; absorbing: {_or(SCHEDULES)}; gaussian: {_or(GAUSSIAN_SCHEDULES)}; "
                        "auto: spindle for lm, mutual for seq2seq, sqrt for gaussian (as the originals), loglinear "
                        "with --objective mdlm (MDLM's)",
                        choices=tuple(dict.fromkeys(("auto", *SCHEDULES, *GAUSSIAN_SCHEDULES))))
    spindle_form: str = opt("released", "spindle: released-code form or paper form (Eq. 10-12)",
                            choices=SPINDLE_FORMS)
    word_freq_lambda: float = opt(0.3, "spindle lambda")
    word_freq_file: str | None = opt(None, "token counts from word_freq.py (default word_freq/<tokenizer>__<dataset>.json)")
    hybrid_lambda: float = opt(0.01, "weight of the auxiliary cross-entropy term (--objective discrete)")
    loss_weighting: str = opt("elbo", "absorbing: elbo (T * KL per noised token + hybrid_lambda * mean CE over "
                              "masked tokens) or released (DiffusionBERT's DDP_main.py: KL summed over the noised "
                              "tokens with no factor T + hybrid_lambda * CE summed over all noised tokens, masked "
                              "or not, divided by the batch size), or released_conditional (DDP_main_conditional.py: "
                              "the same sums, not divided by the batch size); configs stored without it are elbo",
                              choices=LOSS_WEIGHTINGS)
    objective: str = opt("discrete", "absorbing: discrete (the T-step bound, weighted as --loss_weighting says: "
                         "D3PM/DiffusionBERT) or mdlm (MDLM's continuous-time ELBO, Sahoo et al. 2024 Eq. 10: t in "
                         "[0, 1], -alpha'/(1 - alpha) times the SUBS cross-entropy over the masked tokens, no hybrid "
                         "term; --schedule loglinear is MDLM's; not with spindle, which is token-dependent); configs "
                         "stored without it are discrete", choices=OBJECTIVES)
    low_discrepancy: bool = opt(False, "stratify t across the batch (MDLM's low-discrepancy sampler)")
    # gaussian (DiffuSeq, Diffusion-LM) model and training
    # (None: gaussian 128, 768, 12, 12; absorbing: the pretrained model's shape, which only --from_scratch changes)
    emb_dim: int | None = opt(None, "gaussian: word-embedding (diffusion) dimension D (default 128)")
    hidden_size: int | None = opt(None, "gaussian: transformer hidden size (default 768); absorbing: only with "
                                  "--from_scratch (the feed-forward size is then 4x), else the pretrained model's")
    num_layers: int | None = opt(None, "gaussian: transformer layers (default 12); absorbing: only with --from_scratch")
    num_heads: int | None = opt(None, "gaussian: attention heads (default 12); absorbing: only with --from_scratch")
    timestep_sampler: str = opt("lossaware", "gaussian: how t is drawn in training", choices=tuple(TIMESTEP_SAMPLERS))
    ema_rate: float = opt(0.9999, "gaussian: EMA decay of the weights (decoding uses the EMA by default)")
    loss_average: str = opt("all", "gaussian: all: the MSE, L_T and rounding NLL are means over every position, "
                            "source and padding included (DiffuSeq as released: the source embeddings are trained "
                            "too); target: means over the noised positions only (seq2seq: the target and its "
                            "padding; lm: all but [CLS])", choices=LOSS_AVERAGES)
    # post-training (Tang et al. 2023)
    post_train: str | None = opt(None, "gaussian: continue from this checkpoint (its EMA weights) with a fresh "
                                 "optimizer into --out_dir; the model and data flags must match it")
    simi_penalty: str = opt("auto", "gaussian distance penalty: l2_noise_random (released), self_renoise "
                            "(the paper's figure) or none; auto: l2_noise_random with --post_train (every "
                            "post-training command of Tang et al.'s scripts/train.sh names a penalty, and their final "
                            "runs use l2_noise_random), none without (plain DiffuSeq training); --post_train "
                            "--simi_penalty none continues training without one",
                            choices=("auto", "none", "l2_noise_random", "self_renoise"))
    simi_lambda: float = opt(-2.0, "penalty weight, released convention: the loss is (mse + mse' + 2 nll + 2 L_T "
                             "- simi_lambda * penalty) / 2, so -2 is a weight of 1; must be <= 0")
    simi_noise: float = opt(0.05, "neighbourhood of t: |sqrt(1-abar_t') - sqrt(1-abar_t)| <= simi_noise")
    simi_maps: str = opt("released", "which t' the penalty draws: released (Tang et al.'s fill_noise_map: no step "
                         "above t near the top of the chain, none below t near 0) or complete (the whole "
                         "neighbourhood on both sides)", choices=NEIGHBOUR_MAPS)
    # optimisation
    batch_size: int = opt(32, "examples per micro-batch per process")
    accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(5e-5, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(1000, "linear warm-up steps")
    decay: str = opt("linear", "learning-rate decay after warm-up (--lr_schedule warmup)", choices=LR_DECAYS)
    lr_schedule: str = opt("warmup", "warmup: linear warm-up over --warmup_steps, then --decay; ddp_main: "
                           "DiffusionBERT's DDP_main.py (n/W + 1e-3 below W = --warmup_steps, then sqrt(W/n)); "
                           "ddp_main_conditional: DDP_main_conditional.py's LinearLR (lr/3 rising to lr over W "
                           "steps, then constant)", choices=LR_SCHEDULES)
    max_steps: int = opt(10000, f"optimizer steps to train for; {other_steps('max_steps')}")
    grad_clip: float = opt(1.0, "gradient-norm clipping (0: off)")
    grad_clip_value: float = opt(0.0, "clip every gradient element to [-c, c] after each micro-batch's backward, "
                                 "as DiffusionBERT's DDP_main*.py do with 5 (0: off; under DDP with accumulation "
                                 "the micro-batches before the last clip this rank's gradient)")
    dropout: float | None = opt(None, "override the model's dropout probabilities (gaussian default 0.1)")
    bf16: bool = opt(True, "bf16 autocast on CUDA (ignored on CPU)", bool_optional=True)
    compile: bool = opt(False, "torch.compile the network's encoder (worth it for long GPU runs; "
                        "bench.py --compile measures it)")
    # evaluation, checkpoints, logging
    eval_every: int = opt(1000, "dev-set ELBO every N optimizer steps (0: only at the end)")
    eval_examples: int = opt(512, "dev examples used for the ELBO (a fixed, seeded subset)")
    eval_steps: int = opt(64, f"K, the ELBO grid size for the dev estimate; {other_steps('eval_steps')}")
    save_every: int = opt(1000, "write the last checkpoint every N optimizer steps")
    keep_last: int = opt(0, "also keep the K most recent checkpoints as checkpoints/step-<N> (0: only last/best)")
    save_training_state: str = opt("last", "which checkpoints hold training_state.pt (optimizer, scheduler, data "
                                   "position, RNG: what --resume needs, twice the weights' size): last: "
                                   "checkpoints/last only (best/ and step-<N>/ hold weights, configs, tokenizer "
                                   "and model card); all: every checkpoint, so --resume can fall back to step-<N>/ "
                                   "or best/ when last/ is damaged", choices=("last", "all"))
    max_bad_steps: int = opt(10, "stop (saving the last good state) after this many non-finite losses in a row")
    log_every: int = opt(10, "log training metrics every N optimizer steps")
    out_dir: str = opt("outputs/run", "run directory: checkpoints/best, checkpoints/last, metrics.jsonl")
    log_dir: str = opt("logs", "fitlog directory")
    resume: str | None = opt(None, "continue the run in this run directory (or from this checkpoint directory) "
                             "with the flags of its run_config.json; --max_steps, --eval_every, --save_every, "
                             "--log_every, --num_workers, --keep_last, --eval_examples, --max_bad_steps, "
                             "--save_training_state, --device, --compile and --log_dir may be given to change them")
    seed: int = opt(42, "random seed")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    num_workers: int = opt(-1, "DataLoader workers (-1: 4 per process on CUDA, 0 on the CPU)")
    overwrite: bool = opt(False, "start over in an --out_dir that holds an earlier run: its checkpoints/, "
                          "metrics.jsonl and plots/ are deleted first (other files are left alone)")

    # Settings that may change between a run and its resumption; anything else must match.
    RESUMABLE_CHANGES = frozenset({"resume", "max_steps", "eval_every", "save_every", "log_every", "device",
                                   "num_workers", "overwrite", "log_dir", "eval_examples", "keep_last",
                                   "max_bad_steps", "compile", "save_training_state",
                                   "out_dir"})  # a run directory may be moved or copied and resumed there
    # What a --post_train run must share with the checkpoint it starts from (the network and its inputs).
    POST_TRAIN_SAME = ("process", "task", "model_name_or_path", "emb_dim", "hidden_size", "num_layers", "num_heads",
                       "max_len", "num_steps", "schedule", "dataset", "data_files", "truncation")

    def __post_init__(self) -> None:
        if self.process == "gaussian":  # the gaussian transformer's shape defaults; absorbing keeps None
            for k, v in GAUSSIAN_SHAPE.items():
                if getattr(self, k) is None:
                    setattr(self, k, v)

    def resolve_defaults(self) -> None:
        """The defaults that depend on other flags: the gaussian shape, and ``--simi_penalty auto``."""
        self.__post_init__()
        if self.simi_penalty == "auto":
            self.simi_penalty = "l2_noise_random" if self.post_train else "none"

    def check(self) -> None:
        """Reject impossible flag combinations before any work is done; resolve ``--schedule auto`` and
        :meth:`resolve_defaults`."""
        from runtime.dist import pick_device
        gaussian = self.process == "gaussian"
        self.resolve_defaults()
        if self.process == "autoregressive":
            self.check_autoregressive()
        elif self.schedule == "auto":
            self.schedule = ("sqrt" if gaussian else "loglinear" if self.objective == "mdlm"
                             else "spindle" if self.task == "lm" else "mutual")
        pick_device(self.device)
        check_finite(self)
        self.check_paths()
        if not gaussian:
            self.check_absorbing_shape()
        if self.process != "autoregressive" and self.schedule not in PROCESS_SCHEDULES[self.process]:
            raise UserError(f"--schedule {self.schedule} is not a {self.process} schedule; choose one of "
                            f"{', '.join(PROCESS_SCHEDULES[self.process])}")
        self._check_objective()
        require_at_least_one(self, "batch_size", "accumulation_steps", "max_steps", "num_steps", "max_len",
                             "eval_steps", "eval_examples", "save_every", "log_every", "max_bad_steps")
        if self.num_workers < -1:
            raise UserError(f"--num_workers must be -1 (automatic) or more, got {self.num_workers}")
        if self.keep_last < 0:
            raise UserError(f"--keep_last must be 0 or more, got {self.keep_last}")
        if gaussian:
            if self.time_conditioning != "none" or self.from_scratch:
                raise UserError("--time_conditioning and --from_scratch are --process absorbing flags (the gaussian "
                                "transformer is always trained from scratch and always conditioned on t)")
            if self.loss_weighting != "elbo":
                raise UserError(f"--loss_weighting {self.loss_weighting} is DiffusionBERT's (--process absorbing) objective")
            require_at_least_one(self, "emb_dim", "hidden_size", "num_layers", "num_heads")
            if not 0.0 <= self.ema_rate < 1.0:
                raise UserError(f"--ema_rate must be in [0, 1), got {self.ema_rate}")
            if self.simi_noise <= 0:
                raise UserError(f"--simi_noise must be positive, got {self.simi_noise}")
            if self.simi_penalty != "none" and self.simi_lambda > 0:
                raise UserError(f"--simi_lambda must be 0 or negative with the l2 penalty (the loss subtracts "
                                f"simi_lambda * penalty; the released -2 is a weight of 1), got {self.simi_lambda}")
        if not gaussian and (self.post_train or self.simi_penalty != "none"):
            raise UserError("--post_train and --simi_penalty are for --process gaussian (Tang et al.'s post-training)")

        if self.eval_steps > self.num_steps:
            raise UserError(f"--eval_steps {self.eval_steps} exceeds the number of diffusion steps T={self.num_steps}")
        if self.task == "lm":
            if self.dataset not in lm.DATASETS:
                raise UserError(f"--task lm: unknown --dataset {self.dataset!r}; choose one of "
                                f"{', '.join(lm.DATASETS)}")
            if self.dataset == "text" and not self.data_files:
                raise UserError("--dataset text needs --data_files")
            if self.dataset != "text" and self.data_files:
                raise UserError(f"--data_files is only used with --dataset text (got --dataset {self.dataset})")
        elif self.dataset != "bible" and not self.data_files:
            raise UserError(f"--task seq2seq --dataset {self.dataset} needs --data_files, a DiffuSeq folder with "
                            "train.jsonl, valid.jsonl and test.jsonl")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.lr_schedule != "warmup" and self.warmup_steps < 1:
            raise UserError(f"--lr_schedule {self.lr_schedule} needs --warmup_steps 1 or more (its W; the released 10000)")
        if self.grad_clip_value < 0 or self.grad_clip < 0:
            raise UserError(f"--grad_clip and --grad_clip_value must be 0 (off) or positive, got "
                            f"{self.grad_clip} and {self.grad_clip_value}")
        for name in ("warmup_steps", "weight_decay", "hybrid_lambda"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        self._check_canvas()

    # the diffusion flags that an autoregressive run has no use for: refused unless left at their defaults
    DIFFUSION_ONLY = ("num_steps", "schedule", "spindle_form", "word_freq_lambda", "word_freq_file", "hybrid_lambda",
                      "loss_weighting", "low_discrepancy", "time_conditioning", "eval_steps")

    def check_autoregressive(self) -> None:
        """--process autoregressive: --task lm only, and none of the diffusion flags (``DIFFUSION_ONLY``) away
        from their defaults (they would be stored in its config and mean nothing); the gaussian-only flags are
        ignored, as an absorbing run ignores them."""
        if self.task != "lm":
            raise UserError("--process autoregressive is for --task lm (a seq2seq AR baseline is not implemented)")
        defaults = TrainConfig()
        given = [f"--{k}" for k in self.DIFFUSION_ONLY if getattr(self, k) != getattr(defaults, k)]
        if given:
            raise UserError(f"{', '.join(given)}: diffusion flags; --process autoregressive has no steps, schedule or "
                            "time conditioning (its dev metric is the exact NLL)")

    def _check_objective(self) -> None:
        """``--objective mdlm``: an absorbing process with a token-independent schedule, and MDLM's loss alone."""
        if self.objective != "mdlm":
            return
        if self.process != "absorbing":
            raise UserError(f"--objective mdlm is masked (absorbing) diffusion; --process {self.process} has no "
                            "[MASK] state")
        if self.schedule == "spindle":
            raise UserError("--objective mdlm --schedule spindle: the continuous-time weight -alpha'/(1 - alpha) needs "
                            "one alpha for every token, and spindle's depends on the token (MD4's state-dependent "
                            "form is not implemented); use --schedule loglinear, mutual or cosine")
        if self.loss_weighting != "elbo":
            raise UserError(f"--loss_weighting {self.loss_weighting} weights the discrete objective; --objective mdlm "
                            "has its own weight (leave --loss_weighting at elbo)")
        if self.hybrid_lambda not in (0.0, HYBRID_LAMBDA_DEFAULT):
            raise UserError(f"--hybrid_lambda {self.hybrid_lambda}: MDLM's loss has no auxiliary cross-entropy term "
                            "(--hybrid_lambda belongs to --objective discrete)")

    def check_paths(self) -> None:
        """Paths that cannot work, found before anything is loaded."""
        for flag in ("out_dir", "log_dir"):
            path = getattr(self, flag)
            if os.path.exists(path) and not os.path.isdir(path):
                raise UserError(f"--{flag} {path} is a file, not a folder; give a folder (it is created if missing)")
        for flag in ("data_files",):  # (a missing --word_freq_file: its loader gives the command that makes it)
            path = getattr(self, flag)
            if path and not os.path.exists(path):
                raise UserError(f"--{flag} {path} does not exist")

    def check_absorbing_shape(self) -> None:
        """An absorbing run's network is a pretrained masked LM: its shape flags only apply --from_scratch."""
        if self.emb_dim is not None:
            raise UserError("--emb_dim is the gaussian word-embedding size; a BERT-family masked LM embeds words in "
                            "its hidden size (with --from_scratch, set --hidden_size)")
        given = [f"--{k} {getattr(self, k)}" for k in ABSORBING_SHAPE if getattr(self, k) is not None]
        if given and not self.from_scratch:
            raise UserError(f"{' '.join(given)}: the pretrained --model_name_or_path {self.model_name_or_path} has "
                            "its own shape, which these cannot change; add --from_scratch to train a randomly "
                            "initialised masked LM of this shape, or leave them out")
        require_at_least_one(self, *(k for k in ABSORBING_SHAPE if getattr(self, k) is not None))
        if self.hidden_size is not None and self.num_heads is not None and self.hidden_size % self.num_heads:
            raise UserError(f"--hidden_size {self.hidden_size} is not a multiple of --num_heads {self.num_heads}")

    def _check_canvas(self) -> None:
        """The seq2seq canvas flags: refused for lm, ``auto`` resolved by process for seq2seq."""
        gaussian = self.process == "gaussian"
        if self.task == "lm":
            given = [f for f, v in (("canvas", "ours"), ("pad_to", "auto"), ("truncation", "auto"))
                     if getattr(self, f) != v]
            if given:
                raise UserError(f"{', '.join('--' + f for f in given)}: seq2seq flags (the lm batches are laid out "
                                "by the process)")
            return
        self.pad_to, self.truncation = self.seq2seq_layout()
        if gaussian and (self.pad_to == "longest" or self.canvas == "released"):
            raise UserError("--pad_to longest and --canvas released are DiffusionBERT's (--process absorbing); "
                            "DiffuSeq's canvas is --max_len long, laid out [CLS] src [SEP] trg [SEP]")

    def seq2seq_layout(self) -> tuple[str, str]:
        """``(pad_to, truncation)`` with ``auto`` resolved by process: DiffuSeq's fixed canvas and cut for gaussian;
        the same fixed canvas (the decoder's) and our cut for absorbing (DiffusionBERT's own cut, 128 a side, does
        not fit a canvas; its ``pad_sequence`` is ``--pad_to longest``, docs/differences.md)."""
        cut = "diffuseq" if self.process == "gaussian" else "ours"
        return ("max_len" if self.pad_to == "auto" else self.pad_to, cut if self.truncation == "auto" else self.truncation)

    def check_resume(self, stored: dict, ckpt_dir: str) -> None:
        """Resuming ``ckpt_dir``, whose stored config is ``stored``, may change only ``RESUMABLE_CHANGES``."""
        if stored.get("simi_penalty", "none") != "none" and "simi_maps" not in stored:
            raise UserError(f"{ckpt_dir} was post-trained before the loss followed Tang et al.'s release (penalty "
                            "weight twice the released one, MSE target z0); it cannot be resumed: post-train again")
        stored, now = from_dict(stored), dataclasses.replace(self)
        for c in (stored, now):  # an "auto" compares as what it means, as the run itself resolved it
            c.resolve_defaults()
        diffs = [f"--{f.name}: checkpoint {getattr(stored, f.name)!r} vs now {getattr(now, f.name)!r}"
                 for f in dataclasses.fields(self)
                 if f.name not in self.RESUMABLE_CHANGES and getattr(stored, f.name) != getattr(now, f.name)]
        if diffs:
            raise UserError(f"cannot resume {ckpt_dir} with another config ({'; '.join(diffs)})")

    def inherit(self, stored: dict, ckpt_dir: str) -> None:
        """Post-training ``ckpt_dir``, whose stored config is ``stored``: take its ``POST_TRAIN_SAME`` settings
        where this run leaves them at their defaults; a different explicit value is an error."""
        stored = from_dict(stored)
        if stored.process != "gaussian":
            raise UserError(f"--post_train {ckpt_dir} is a {stored.process} checkpoint; post-training needs a "
                            "gaussian one")
        defaults, diffs = TrainConfig(process=self.process), []
        for k in self.POST_TRAIN_SAME:
            mine, theirs = getattr(self, k), getattr(stored, k)
            if mine == getattr(defaults, k):
                setattr(self, k, theirs)
            elif mine != theirs:
                diffs.append(f"--{k}: checkpoint {theirs!r} vs now {mine!r}")
        if diffs:
            raise UserError(f"--post_train {ckpt_dir} was trained with other settings ({'; '.join(diffs)})")


HYBRID_LAMBDA_DEFAULT = 0.01  # TrainConfig.hybrid_lambda's default: --objective mdlm ignores it
GAUSSIAN_SHAPE = {"emb_dim": 128, "hidden_size": 768, "num_layers": 12, "num_heads": 12}  # DiffuSeq's base
ABSORBING_SHAPE = ("hidden_size", "num_layers", "num_heads")  # what --from_scratch can change in a masked LM


def check_finite(cfg) -> None:
    """Every float flag is a number: nan and inf pass the range checks (nan <= 0 is False) and poison a run."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"--{f.name} must be a finite number, got {v}")


def build_parser(cls=TrainConfig, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field; booleans are real switches. ``description``: the
    script's docstring (its first paragraph is shown); every flag's help ends with its default."""
    p = make_parser(description)
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
        p.add_argument(f"--{f.name}", type=typ, default=f.default, help=help_, **meta)
    return p


def given_flags(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The names of the flags given on the command line ``argv`` (None: ``sys.argv``), whatever their values:
    argparse leaves a namespace attribute alone when it is already set, so only given flags replace a marker."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    return {k for k, v in vars(parser.parse_args(argv, namespace=ns)).items() if v is not unset}


def from_args(ns: argparse.Namespace, cls=TrainConfig):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


# What a stored config written before a field existed did, where that differs from the field's default:
# such runs were trained that way, and a resumed or inspected run must say so.
LEGACY_VALUES = {"loss_average": "target", "simi_maps": "complete"}
# the same for the seq2seq canvas flags, whose lm value is their default
SEQ2SEQ_LEGACY_VALUES = {"pad_to": "max_len", "truncation": "ours"}


def from_dict(d: dict, cls=TrainConfig):
    """Rebuild a config from stored JSON; unknown keys (from newer versions) are ignored, and missing
    keys take their ``LEGACY_VALUES`` (else their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    old = {**LEGACY_VALUES, **(SEQ2SEQ_LEGACY_VALUES if d.get("task") == "seq2seq" else {})}
    legacy = {k: v for k, v in old.items() if k in names and k not in d} if cls is TrainConfig else {}
    d = {k: v for k, v in d.items() if k in names}
    if cls is TrainConfig and d.get("process", "absorbing") == "absorbing" and isinstance(d.get("emb_dim"), int):
        # written when the gaussian shape defaults (128, 768, 12, 12) were stored for absorbing runs too, which
        # never used them (their network was the pretrained model's shape, --from_scratch included)
        d.update(dict.fromkeys(GAUSSIAN_SHAPE))
    return cls(**legacy, **d)
