"""Build the denoiser and the diffusion process from a run config, for training and for inference
(``predict.py``, ``compute_elbo.py`` rebuild everything from ``--checkpoint`` alone, offline), and the
network a run starts training from (``initial_network``: ``train.py``'s step 0, and the untrained baseline
of ``compute_elbo.py --baselines``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from diffusion import AbsorbingDiffusion, GaussianDiffusion, gaussian_betas, make_schedule
from diffusion.autoregressive import Autoregressive
from models import BertDenoiser, DiffuSeqTransformer, spare_token_ids
from runtime import checkpoint
from runtime.weights import load_into as load_weights
from runtime.config import TrainConfig, from_dict
from common.errors import UserError
from common.loading import check_tokenizer, load_masked_lm, load_tokenizer, load_tokenizer_and_config
from runtime.training import seed_everything


GAUSSIAN_DROPOUT = 0.1  # DiffuSeq's default
# the weights a gaussian checkpoint decodes with (--weights): the EMA (as DiffuSeq) or the raw ones
WEIGHTS = {"ema": "the EMA of the weights (denoiser_ema.safetensors)", "raw": "the trained weights"}


def build_diffusion(cfg: TrainConfig, mask_id: int | None, pad_id: int | None, counts=None, tokenizer=None):
    """The run's process: ``AbsorbingDiffusion``, ``GaussianDiffusion`` or ``Autoregressive`` (which needs the
    ``tokenizer``: its end token and the tokens it never predicts)."""
    try:
        return PROCESS_PARTS[cfg.process].build_process(cfg, mask_id, pad_id, counts, tokenizer)
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


def _absorbing(cfg: TrainConfig, mask_id, pad_id, counts, tokenizer=None) -> AbsorbingDiffusion:
    schedule = make_schedule(cfg.schedule, counts=counts, lam=cfg.word_freq_lambda, form=cfg.spindle_form,
                             pad_id=pad_id)
    return AbsorbingDiffusion(schedule, cfg.num_steps, mask_id, cfg.hybrid_lambda)


def _gaussian(cfg: TrainConfig, mask_id, pad_id, counts, tokenizer=None) -> GaussianDiffusion:
    return GaussianDiffusion(gaussian_betas(cfg.schedule, cfg.num_steps), cfg.schedule)


def _autoregressive(cfg: TrainConfig, mask_id, pad_id, counts, tokenizer=None) -> Autoregressive:
    """The AR process over the tokenizer: it ends a text at [SEP] and never predicts [CLS], [PAD] or [MASK] (nor a
    BOS other than [CLS]), tokens that never follow [CLS] in the lm data (``textdata.lm``)."""
    if tokenizer is None or tokenizer.sep_token_id is None:
        raise ValueError("--process autoregressive needs a tokenizer with a [SEP] token to end a text")
    never = (tokenizer.cls_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id, tokenizer.bos_token_id)
    return Autoregressive(tokenizer.sep_token_id, [i for i in never if i is not None and i != tokenizer.sep_token_id],
                          cfg.max_len)


def _causal(hf_config):
    """A BERT-family masked LM of ``hf_config`` made causal: ``is_decoder`` makes transformers build a causal
    attention mask (each position attends to itself and the positions before it); no key-value cache in training.
    transformers' warning that a masked LM is meant to be bidirectional is silenced: here it is not."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging
    hf_config.is_decoder, hf_config.use_cache = True, False
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForMaskedLM.from_config(hf_config)
    finally:
        hf_logging.set_verbosity(verbosity)


def _causal_bert_from_config(cfg: TrainConfig, hf_config, tokenizer) -> BertDenoiser:
    return build_denoiser(cfg, _causal(hf_config), tokenizer)


def _causal_bert_initial(cfg: TrainConfig, log):
    """The AR baseline's network: the absorbing run's (``_bert_initial``: the same pretrained or --from_scratch
    weights, the same seed), rebuilt causal with those weights."""
    denoiser, tokenizer, model_path, hf_config = _bert_initial(cfg, log)
    causal = _causal(hf_config)
    causal.load_state_dict(denoiser.mlm.state_dict())
    log("model: causal attention (--process autoregressive): position j sees positions 0..j")
    return build_denoiser(cfg, causal, tokenizer), tokenizer, model_path, causal.config


def _bert_from_config(cfg: TrainConfig, hf_config, tokenizer) -> BertDenoiser:
    from transformers import AutoModelForMaskedLM
    return build_denoiser(cfg, AutoModelForMaskedLM.from_config(hf_config), tokenizer)


def _diffuseq_from_config(cfg: TrainConfig, hf_config, tokenizer) -> DiffuSeqTransformer:
    """The DiffuSeq transformer of ``cfg`` over the tokenizer's vocabulary (``hf_config`` is not needed: a gaussian
    checkpoint has none, and the tokenizer was checked against the stored vocabulary size)."""
    return build_gaussian_denoiser(cfg, len(tokenizer))


def _bert_initial(cfg: TrainConfig, log):
    """DiffusionBERT's network: a pretrained (or --from_scratch) BERT-family masked LM; weights the pretrained
    checkpoint lacks (a new masked-LM head) are drawn from the global RNG."""
    shape = {hf: getattr(cfg, k) for k, hf in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                                                ("num_heads", "num_attention_heads")) if getattr(cfg, k) is not None}
    mlm, tokenizer, model_path = load_masked_lm(cfg.model_name_or_path, cfg.from_scratch, log=log, shape=shape)
    check_tokenizer(tokenizer, mlm.config.vocab_size, model_path)
    if cfg.max_len + (cfg.time_conditioning == "token") > mlm.config.max_position_embeddings:
        raise UserError(f"--max_len {cfg.max_len} exceeds the model's {mlm.config.max_position_embeddings} positions")
    if cfg.dropout is not None:
        for m in mlm.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.dropout
    return build_denoiser(cfg, mlm, tokenizer), tokenizer, model_path, mlm.config


def _diffuseq_initial(cfg: TrainConfig, log):
    """DiffuSeq's network: a transformer trained from scratch, with the tokenizer of --model_name_or_path."""
    tokenizer, model_path = load_tokenizer(cfg.model_name_or_path)
    denoiser = build_gaussian_denoiser(cfg, len(tokenizer))
    n = sum(p.numel() for p in denoiser.parameters())
    log(f"model: DiffuSeq transformer from scratch, {n / 1e6:.2f}M parameters (emb {cfg.emb_dim}, hidden "
        f"{cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, vocab {len(tokenizer)} from {model_path})")
    return denoiser, tokenizer, model_path, denoiser.config


def check_canvas_memory(cfg: TrainConfig) -> None:
    """A gaussian canvas of --max_len positions must fit the device: every position of a micro-batch goes through
    the rounding head, whose logits [B, L, V] (float32) and their gradient alone take 8 B L V bytes; refuse a
    --max_len for which that lower bound exceeds the device's whole memory (it would fail after the data work).
    Loads only the tokenizer (V), so train.py calls it before it makes the run directory."""
    from runtime.dist import memory_bytes, pick_device
    if cfg.process != "gaussian":
        return
    vocab_size = len(load_tokenizer(cfg.model_name_or_path)[0])
    device = pick_device(cfg.device)
    need, have = 8 * cfg.batch_size * cfg.max_len * vocab_size, memory_bytes(device)
    if need > have:
        longest = have // (8 * cfg.batch_size * vocab_size)
        raise UserError(f"--max_len {cfg.max_len}: a micro-batch of {cfg.batch_size} canvases needs at least "
                        f"{need / 2**30:.0f} GiB for the rounding head's logits [B, L, V] = [{cfg.batch_size}, "
                        f"{cfg.max_len}, {vocab_size}] and their gradient, more than the {have / 2**30:.0f} GiB of "
                        f"{device.type}; at this --batch_size --max_len must be at most {longest}")


@dataclass(frozen=True)
class ProcessParts:
    """What differs between the processes when a run is rebuilt: one entry of ``PROCESS_PARTS`` per process."""
    build_process: Callable      # (cfg, mask_id, pad_id, counts, tokenizer) -> the process
    build_network: Callable      # (cfg, hf_config, tokenizer) -> the denoiser, before its weights are loaded
    build_initial: Callable      # (cfg, log) -> (denoiser, tokenizer, model_path, hf_config): what training starts from
    weight_sets: dict            # --weights -> the weight set the inference scripts load (runtime/weights.py)
    needs_mask: bool             # whether the tokenizer must have a [MASK] token


PROCESS_PARTS = {
    "absorbing": ProcessParts(_absorbing, _bert_from_config, _bert_initial, {w: "raw" for w in WEIGHTS},
                              needs_mask=True),
    "gaussian": ProcessParts(_gaussian, _diffuseq_from_config, _diffuseq_initial, {w: w for w in WEIGHTS},
                             needs_mask=False),
    "autoregressive": ProcessParts(_autoregressive, _causal_bert_from_config, _causal_bert_initial, {w: "raw" for w in WEIGHTS},
                                   needs_mask=False),
}


def initial_network(cfg: TrainConfig, log=print):
    """The network at step 0 of a run with this config, before any update: the global RNGs are seeded with
    ``cfg.seed`` and the network is built from ``--model_name_or_path`` (pretrained weights, and anything they
    lack drawn from that seed; or ``--from_scratch``). ``train.py`` starts from it (a ``--post_train`` run then
    loads its start checkpoint's EMA into it). Returns ``(denoiser, tokenizer, model_path, hf_config)``."""
    seed_everything(cfg.seed)
    return PROCESS_PARTS[cfg.process].build_initial(cfg, log)


def load_initial(run: Loaded, device: torch.device, log=print):
    """The untrained network of a loaded checkpoint: ``initial_network`` of its run config, in eval mode on
    ``device``. Needs ``--model_name_or_path`` of the run where it was (a hub id, a directory or ``minilm``)
    and refuses a tokenizer other than the checkpoint's."""
    from textdata.lm import vocab_fingerprint
    if run.cfg.post_train:
        raise UserError(f"{run.ckpt_dir} was post-trained from {run.cfg.post_train}: its untrained network is that "
                        "run's, not one built from the config")
    try:
        denoiser, tokenizer, model_path, _ = initial_network(run.cfg, log)
    except UserError as e:
        raise UserError(f"the untrained network of {run.ckpt_dir} is rebuilt from its --model_name_or_path "
                        f"{run.cfg.model_name_or_path}: {e}") from e
    if vocab_fingerprint(tokenizer) != run.run_info["derived"]["vocab_fingerprint"]:
        raise UserError(f"the tokenizer of {model_path} is not the one {run.ckpt_dir} was trained with; "
                        "the untrained network cannot be rebuilt")
    return denoiser.to(device).eval()


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
        # gaussian (Diffusion-LM): a max_len canvas whose [SEP] and padding are generated, as in seq2seq below
        return data, lm.collator_for(tokenizer, canvas_len=cfg.max_len if cfg.process == "gaussian" else None)
    from conditional_data import PairCollator, load_pair_splits, tokenize_pairs
    raw = load_pair_splits(cfg.dataset, cfg.data_files, cfg.data_dir, splits=tuple(splits), log=log,
                           skip_bad_lines=cfg.skip_bad_lines)
    pad_to, truncation = cfg.seq2seq_layout()
    data = tokenize_pairs(raw, tokenizer, cfg.max_len, log=log, canvas=cfg.canvas, truncation=truncation,
                          dataset=cfg.dataset)
    # the model generates the target's padding: to the batch's longest row (DiffusionBERT) or max_len (DiffuSeq)
    return data, PairCollator(tokenizer.pad_token_id, canvas_len=None if pad_to == "longest" else cfg.max_len)


def load_for_inference(path: str, device: torch.device, prefer: str = "best", task: str = "lm",
                       weights: str = "ema") -> Loaded:
    """Rebuild tokenizer, network and process from a checkpoint (or a run directory).

    ``weights`` (a key of ``WEIGHTS``): for a gaussian checkpoint, ``ema`` (the default, as DiffuSeq decodes)
    or ``raw``; absorbing checkpoints have only their trained weights. Old checkpoints (model.pt, ema.pt) load
    too, with one line on stderr saying so. ``task``: refuse a checkpoint of another task, naming its script
    (None: any task)."""
    ckpt_dir = checkpoint.resolve(path, prefer)
    run_info = checkpoint.read_run_config(ckpt_dir)
    cfg = from_dict(run_info["config"])
    if task is not None and cfg.task != task:
        raise UserError(f"{ckpt_dir} is a {cfg.task} checkpoint but this script needs a {task} one; "
                        f"use {SCRIPT_FOR_TASK.get(cfg.task, 'the script for that task')}")
    parts = PROCESS_PARTS[cfg.process]
    if cfg.process == "gaussian" and not os.path.isfile(os.path.join(ckpt_dir, "config.json")):
        # a gaussian checkpoint has no transformers config (older ones have one): its vocabulary size is in run_config
        tokenizer, _ = load_tokenizer(ckpt_dir)
        hf_config, vocab_size = None, run_info.get("derived", {}).get("vocab_size", len(tokenizer))
    else:
        tokenizer, hf_config = load_tokenizer_and_config(ckpt_dir)
        vocab_size = hf_config.vocab_size
    check_tokenizer(tokenizer, vocab_size, ckpt_dir, need_mask=parts.needs_mask)
    denoiser = parts.build_network(cfg, hf_config, tokenizer)
    load_weights(ckpt_dir, denoiser, parts.weight_sets[weights])
    denoiser.to(device).eval()
    counts = None
    if cfg.schedule == "spindle":
        wf = os.path.join(ckpt_dir, "word_freq.json")
        from textdata import word_freq
        counts = torch.tensor(word_freq.load(wf, vocab_size=vocab_size)["counts"])
    diffusion = build_diffusion(cfg, tokenizer.mask_token_id, tokenizer.pad_token_id, counts, tokenizer)
    return Loaded(ckpt_dir, cfg, run_info, tokenizer, denoiser, diffusion)
