"""Build the denoiser and the diffusion process from a run config, for training and for inference
(``predict.py``, ``compute_elbo.py`` rebuild everything from ``--checkpoint`` alone, offline)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from diffusion import AbsorbingDiffusion, GaussianDiffusion, gaussian_betas, make_schedule
from models import BertDenoiser, DiffuSeqTransformer, spare_token_ids
from runtime import checkpoint
from runtime.config import TrainConfig, from_dict
from common.errors import UserError
from common.loading import check_tokenizer, load_tokenizer_and_config


GAUSSIAN_DROPOUT = 0.1  # DiffuSeq's default
# the weights a gaussian checkpoint decodes with (--weights): the EMA (ema.pt, as DiffuSeq) or the raw ones
WEIGHTS = {"ema": "ema.pt", "raw": "model.pt"}


def build_diffusion(cfg: TrainConfig, mask_id: int | None, pad_id: int | None, counts=None):
    """The run's process: ``AbsorbingDiffusion`` or ``GaussianDiffusion``."""
    try:
        return PROCESS_PARTS[cfg.process].build_process(cfg, mask_id, pad_id, counts)
    except ValueError as e:
        raise UserError(str(e)) from e


def build_gaussian_denoiser(cfg: TrainConfig, vocab_size: int) -> DiffuSeqTransformer:
    try:
        return DiffuSeqTransformer(vocab_size, cfg.emb_dim, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                                   cfg.max_len, cfg.num_steps,
                                   GAUSSIAN_DROPOUT if cfg.dropout is None else cfg.dropout)
    except ValueError as e:
        raise UserError(str(e)) from e


def build_denoiser(cfg: TrainConfig, mlm, tokenizer) -> BertDenoiser:
    try:
        return BertDenoiser(mlm, cfg.time_conditioning, cfg.num_steps, spare_token_ids(tokenizer))
    except ValueError as e:
        raise UserError(str(e)) from e


def _absorbing(cfg: TrainConfig, mask_id, pad_id, counts) -> AbsorbingDiffusion:
    schedule = make_schedule(cfg.schedule, counts=counts, lam=cfg.word_freq_lambda, form=cfg.spindle_form,
                             pad_id=pad_id)
    return AbsorbingDiffusion(schedule, cfg.num_steps, mask_id, cfg.hybrid_lambda)


def _gaussian(cfg: TrainConfig, mask_id, pad_id, counts) -> GaussianDiffusion:
    return GaussianDiffusion(gaussian_betas(cfg.schedule, cfg.num_steps), cfg.schedule)


def _bert_from_config(cfg: TrainConfig, hf_config, tokenizer) -> BertDenoiser:
    from transformers import AutoModelForMaskedLM
    return build_denoiser(cfg, AutoModelForMaskedLM.from_config(hf_config), tokenizer)


def _diffuseq_from_config(cfg: TrainConfig, hf_config, tokenizer) -> DiffuSeqTransformer:
    return build_gaussian_denoiser(cfg, hf_config.vocab_size)


@dataclass(frozen=True)
class ProcessParts:
    """What differs between the processes when a run is rebuilt: one entry of ``PROCESS_PARTS`` per process."""
    build_process: Callable      # (cfg, mask_id, pad_id, counts) -> the process
    build_network: Callable      # (cfg, hf_config, tokenizer) -> the denoiser, before its weights are loaded
    weights_files: dict          # --weights -> the checkpoint file the inference scripts load
    needs_mask: bool             # whether the tokenizer must have a [MASK] token


PROCESS_PARTS = {
    "absorbing": ProcessParts(_absorbing, _bert_from_config, {w: "model.pt" for w in WEIGHTS}, needs_mask=True),
    "gaussian": ProcessParts(_gaussian, _diffuseq_from_config, WEIGHTS, needs_mask=False),
}


@dataclass
class Loaded:
    ckpt_dir: str
    cfg: TrainConfig
    run_info: dict
    tokenizer: object
    denoiser: BertDenoiser | DiffuSeqTransformer
    diffusion: AbsorbingDiffusion | GaussianDiffusion

    @property
    def run_name(self) -> str:
        """The run directory's name (``<run>/checkpoints/<name>``), for naming outputs."""
        return os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(self.ckpt_dir))))

    def check_steps(self, n: int, flag: str) -> None:
        if n > self.cfg.num_steps:
            raise UserError(f"{flag} {n} exceeds the checkpoint's number of diffusion steps T={self.cfg.num_steps}")


SCRIPT_FOR_TASK = {"lm": "predict.py / compute_elbo.py", "seq2seq": "predict_downstream_condition.py"}


def load_task_data(cfg: TrainConfig, tokenizer, splits=("train", "valid"), log=print):
    """Tokenised splits and the collator for the run's task: (DatasetDict, collate)."""
    from textdata import lm
    if cfg.task == "lm":
        raw = lm.load_text_splits(cfg.dataset, cfg.data_files, cfg.data_dir, log=log,
                                  skip_bad_lines=cfg.skip_bad_lines)
        data = lm.tokenize_splits({s: raw[s] for s in splits}, tokenizer, cfg.max_len, log=log)
        return data, lm.collator_for(tokenizer)
    from conditional_data import PairCollator, load_pair_splits, tokenize_pairs
    raw = load_pair_splits(cfg.dataset, cfg.data_files, cfg.data_dir, splits=tuple(splits), log=log,
                           skip_bad_lines=cfg.skip_bad_lines)
    data = tokenize_pairs(raw, tokenizer, cfg.max_len, log=log)
    # DiffuSeq style: every row is a max_len canvas and the model generates the target's padding
    return data, PairCollator(tokenizer.pad_token_id, canvas_len=cfg.max_len)


def load_for_inference(path: str, device: torch.device, prefer: str = "best", task: str = "lm",
                       weights: str = "ema") -> Loaded:
    """Rebuild tokenizer, network and process from a checkpoint (or a run directory).

    ``weights`` (a key of ``WEIGHTS``): for a gaussian checkpoint, ``ema`` (ema.pt, the default, as DiffuSeq
    decodes) or ``raw`` (model.pt); absorbing checkpoints have only model.pt."""
    ckpt_dir = checkpoint.resolve(path, prefer)
    run_info = checkpoint.read_run_config(ckpt_dir)
    cfg = from_dict(run_info["config"])
    if cfg.task != task:
        raise UserError(f"{ckpt_dir} is a {cfg.task} checkpoint but this script needs a {task} one; "
                        f"use {SCRIPT_FOR_TASK.get(cfg.task, 'the script for that task')}")
    parts = PROCESS_PARTS[cfg.process]
    tokenizer, hf_config = load_tokenizer_and_config(ckpt_dir)
    check_tokenizer(tokenizer, hf_config.vocab_size, ckpt_dir, need_mask=parts.needs_mask)
    denoiser = parts.build_network(cfg, hf_config, tokenizer)
    state = checkpoint.load_state(ckpt_dir, parts.weights_files[weights])
    try:
        denoiser.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"the weights in {ckpt_dir} do not fit the stored model config: "
                        f"{str(e).splitlines()[0]}") from e
    denoiser.to(device).eval()
    counts = None
    if cfg.schedule == "spindle":
        wf = os.path.join(ckpt_dir, "word_freq.json")
        from textdata import word_freq
        counts = torch.tensor(word_freq.load(wf, vocab_size=hf_config.vocab_size)["counts"])
    diffusion = build_diffusion(cfg, tokenizer.mask_token_id, tokenizer.pad_token_id, counts)
    return Loaded(ckpt_dir, cfg, run_info, tokenizer, denoiser, diffusion)
