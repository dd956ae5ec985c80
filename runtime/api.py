"""Sampling from a trained checkpoint in Python: load it once, then ask for strings.

    from runtime.api import load
    m = load("outputs/demo/checkpoints/best")      # a checkpoint directory, or a run directory (its best)
    m.sample(8, steps=128)                          # an lm checkpoint: 8 strings
    m.decode(["a source", "another"], steps=200)    # an absorbing seq2seq checkpoint: one string per source
    m.decode(sources, respacing="adp_20")           # a gaussian (DiffuSeq) one

``predict.py`` and ``predict_downstream_condition.py`` sample through this object, so for the same
checkpoint, settings, ``seed`` and ``batch_size``, ``sample`` returns the lines of predict.py's file and
``decode`` the ``recover`` fields of the decoder's ``seed<k>.jsonl`` (for the sources that the pair data
left uncut: ``decode`` never cuts one, and refuses one longer than max_len - 2): DiffuSeq's strings, the generated
target region with its [SEP] kept and its trailing [PAD]s dropped (``evaluation.seq2seq.strip_special``
removes the special tokens as the metrics do). Batch b draws from a generator of its own, seeded with
(seed, b) (``dist.map_batches``): the same call gives the same strings again, on any number of ranks.

A bad request is a ``UserError`` of one line that names the keyword argument. The scripts' checks are
these same ones, naming the scripts' flags instead (``load(..., flags=True)``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from diffusion import SAMPLERS, SampleOutput
from runtime import dist
from runtime.assemble import WEIGHTS, Loaded, load_for_inference
from common.errors import UserError

# the scripts' flag for an option whose flag is not --<keyword>
FLAGS = {"respacing": "--decode_respacing", "cache=False": "--no_cache"}


@dataclass(frozen=True)
class Sampling:
    """Unconditional sampling settings, checked against an lm checkpoint (``Model.sampling``)."""
    steps: int                 # iterations over a grid of 0..T
    sampler: str               # a name of diffusion.SAMPLERS
    topk: int
    top_p: float
    temperature: float
    use_cache: bool            # the MDLM cache: asked for, and the denoiser ignores t
    length: int | None         # wordpieces between [CLS] and [SEP]; None: drawn from the training lengths
    max_len: int               # the longest sample, [CLS] and [SEP] included


@dataclass
class Decoding:
    """How a seq2seq checkpoint decodes, checked against it (``Model.decoding``; one per process in
    ``DECODINGS``)."""
    setting: str                                 # in the decoder's default output folder name
    steps: int | None                            # absorbing: iterations; gaussian: None (see report)
    use_cache: bool
    sample: Callable[..., SampleOutput]          # (ids, attention_mask, noise_mask, generator) -> SampleOutput
    report: dict = field(default_factory=dict)   # extra keys of decode.json


@dataclass
class Generated:
    """The strings of ``Model.sample_batches`` / ``decode_batches`` (rank 0) and what they cost."""
    texts: list[str]           # one per sample / source, in order
    network_calls: int         # batched denoiser invocations, summed over the batches
    row_evaluations: int       # sequences passed through the denoiser, summed over the calls


def load(path: str, device: str | torch.device = "auto", *, weights: str = "ema", prefer: str = "best",
         task: str | None = None, info: dist.DistInfo | None = None, flags: bool = False) -> Model:
    """Load a checkpoint directory, or a run directory (its ``checkpoints/<prefer>``), for sampling.

    ``device``: ``auto`` (cuda if there is one, else cpu) or a torch device. ``weights``: what a gaussian
    checkpoint decodes with, ``ema`` (as DiffuSeq; the default) or ``raw``; an absorbing checkpoint has
    one set and ``decode`` refuses ``raw``. ``task`` (``lm``/``seq2seq``): refuse a checkpoint of the other
    task, with the message that names the other script; None takes the checkpoint's task. ``info``: the
    scripts' ``dist.DistInfo`` under torchrun (the batches are shared out among the ranks and only rank 0
    gets the strings), in place of ``device``. ``flags``: the checks name the scripts' flags (``--steps``).
    """
    if weights not in WEIGHTS:
        raise UserError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if info is None:
        try:
            info = dist.DistInfo(device=dist.pick_device(device))
        except RuntimeError as e:
            raise UserError(f"device {device!r}: {e}") from e
    run = load_for_inference(path, info.device, prefer, task=task, weights=weights)
    return Model(run, info, weights, flags)


@contextlib.contextmanager
def flush_denormal(device: torch.device):
    """On the CPU, denormal floats count as zero inside the block (speed; how the decoder has always run),
    then torch's default (off) again."""
    on = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


class Model:
    """A loaded checkpoint (``run``: its config, tokenizer, denoiser and process) and where it samples
    (``info``: the device, and the ranks under torchrun)."""

    def __init__(self, run: Loaded, info: dist.DistInfo, weights: str = "ema", flags: bool = False):
        self.run, self.info, self.weights, self.flags = run, info, weights, flags

    @property
    def task(self) -> str:
        return self.run.cfg.task

    @property
    def process(self) -> str:
        return self.run.cfg.process

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def device(self) -> torch.device:
        return self.info.device

    def __repr__(self) -> str:
        return (f"Model({self.run.ckpt_dir!r}: {self.task}, {self.process}, T={self.run.cfg.num_steps}, "
                f"max_len={self.run.cfg.max_len}, on {self.device})")

    # ------------------------------------------------------------------------ checks
    def _name(self, key: str) -> str:
        """How a check names an option: the keyword argument, or the scripts' flag."""
        return FLAGS.get(key, f"--{key}") if self.flags else key

    def _setting(self, key: str, value: str) -> str:
        """An option set to a value as the user writes it: ``--decode_respacing adp_20``, ``respacing='adp_20'``."""
        return f"{self._name(key)} {value}" if self.flags else f"{key}={value!r}"

    def _at_least_one(self, **counts: int) -> None:
        for key, n in counts.items():
            if n < 1:
                raise UserError(f"{self._name(key)} must be at least 1, got {n}")

    def _check_filters(self, sampler: str, topk: int, top_p: float, temperature: float) -> None:
        n = self._name
        if topk < 0 or not 0.0 < top_p <= 1.0 or temperature <= 0:
            raise UserError(f"need {n('topk')} >= 0, 0 < {n('top_p')} <= 1 and {n('temperature')} > 0")
        if sampler not in SAMPLERS:
            raise UserError(f"{n('sampler')} must be one of {', '.join(SAMPLERS)}, got {sampler!r}")

    def _need_task(self, task: str) -> None:
        if self.task == task:
            return
        if task == "lm":
            raise UserError(f"{self.run.ckpt_dir} is a {self.task} checkpoint: sample() draws from lm checkpoints; "
                            "give it sources with decode()")
        raise UserError(f"{self.run.ckpt_dir} is an {self.task} checkpoint: decode() is for seq2seq checkpoints; "
                        "draw from it with sample()")

    # ------------------------------------------------------------------------ lm
    def sampling(self, steps: int = 128, sampler: str = "ours", topk: int = 0, top_p: float = 1.0,
                 temperature: float = 1.0, cache: bool = True, length: int | None = None,
                 max_len: int | None = None) -> Sampling:
        """Check unconditional sampling settings against this lm checkpoint (see :meth:`sample`)."""
        self._need_task("lm")
        self._at_least_one(steps=steps)
        self._check_filters(sampler, topk, top_p, temperature)
        n, train_max_len = self._name, self.run.cfg.max_len
        if max_len is not None and not 3 <= max_len <= train_max_len:
            raise UserError(f"{n('max_len')} must be between 3 and the training --max_len {train_max_len}, "
                            f"got {max_len}")
        longest = (max_len or train_max_len) - 2
        if length is not None and not 1 <= length <= longest:
            raise UserError(f"{n('length')} must be between 1 and {longest} ({n('max_len')} minus [CLS] and [SEP]), "
                            f"got {length}")
        self.run.check_steps(steps, n("steps"))
        return Sampling(steps, sampler, topk, top_p, temperature, cache and self.run.denoiser.time_agnostic, length,
                        max_len or train_max_len)

    def sample_batches(self, num_samples: int, sampling: Sampling, seed: int = 42, batch_size: int = 32,
                       on_batch: Callable[[int], None] | None = None) -> Generated | None:
        """``num_samples`` samples, in batches of ``batch_size`` shared out among the ranks: on rank 0 a
        :class:`Generated`, None on the others. ``on_batch(n)``: called after each of this rank's batches.

        Each sample's length n (wordpieces between [CLS] and [SEP]) is ``sampling.length``, or drawn from
        the training-length histogram by a generator seeded with ``seed``; samples of similar lengths share
        a batch (little padding), and ``[CLS] [MASK]*n [SEP]`` is denoised over a grid of ``sampling.steps``.
        A text is the generated wordpieces decoded without special tokens, single-spaced.
        """
        from textdata.lm import LengthPrior, canvas
        self._at_least_one(num_samples=num_samples, batch_size=batch_size)
        run, tok, device = self.run, self.tokenizer, self.device
        gen_len = torch.Generator().manual_seed(seed)
        if sampling.length is not None:
            lengths = torch.full((num_samples,), sampling.length, dtype=torch.long)
        else:
            lengths = LengthPrior(run.run_info["derived"]["length_counts"]).sample(num_samples, sampling.max_len - 2,
                                                                                   gen_len)
        order = torch.argsort(lengths, stable=True)  # similar lengths share a batch: little padding

        def sample_batch(b: int, gen: torch.Generator):
            """Batch b: ({sample index: text}, network calls, sequence evaluations)."""
            idx = order[b * batch_size:(b + 1) * batch_size]
            ids, att, noise = (x.to(device) for x in canvas(lengths[idx], tok.cls_token_id, tok.sep_token_id,
                                                             tok.pad_token_id, tok.mask_token_id))
            out = run.diffusion.sample(run.denoiser, ids, noise, att, sampling.steps, sampling.topk, sampling.top_p,
                                       sampling.temperature, cache=sampling.use_cache, generator=gen,
                                       sampler=sampling.sampler)
            texts = {j: " ".join(tok.decode(row[1:int(lengths[j]) + 1], skip_special_tokens=True).split())
                     for j, row in zip(idx.tolist(), out.x0.cpu())}
            return texts, out.network_calls, out.row_evaluations

        results = dist.map_batches(-(-num_samples // batch_size), sample_batch, self.info, seed, on_batch=on_batch)
        if results is None:  # not rank 0
            return None
        texts = {j: text for batch_texts, _, _ in results for j, text in batch_texts.items()}
        return Generated([texts[j] for j in range(num_samples)], sum(r[1] for r in results),
                         sum(r[2] for r in results))

    def sample(self, num_samples: int, *, steps: int = 128, seed: int = 42, batch_size: int = 32,
               sampler: str = "ours", topk: int = 0, top_p: float = 1.0, temperature: float = 1.0,
               length: int | None = None, max_len: int | None = None, cache: bool = True) -> list[str]:
        """``num_samples`` strings from an lm checkpoint (predict.py's lines for the same arguments).

        ``steps``: iterations over a grid of 0..T (at most T). ``sampler``: ``ours`` (``topk``/``top_p``/
        ``temperature`` filter p_hat, then the exact reverse step) or ``released`` (DiffusionBERT's: they
        filter the posterior logits). ``length``: every sample has this many wordpieces between [CLS] and
        [SEP] (default: drawn from the training lengths); ``max_len``: the longest sample with [CLS]/[SEP]
        (default: the training max_len). ``cache``: reuse p_hat for rows that did not change (only where the
        denoiser ignores t; the strings are the same either way). The output depends on ``seed`` and
        ``batch_size``. Under a torchrun ``info``, ranks other than 0 get None.
        """
        out = self.sample_batches(num_samples, self.sampling(steps, sampler, topk, top_p, temperature, cache, length,
                                                             max_len), seed, batch_size)
        return None if out is None else out.texts

    # ------------------------------------------------------------------------ seq2seq
    def decoding(self, steps: int | None = None, respacing=None, sampler: str = "ours", topk: int = 0,
                 top_p: float = 1.0, temperature: float = 1.0, cache: bool = True) -> Decoding:
        """Check decoding settings against this seq2seq checkpoint (see :meth:`decode`)."""
        self._need_task("seq2seq")
        self._check_filters(sampler, topk, top_p, temperature)
        return DECODINGS[self.process](self, steps, respacing, sampler, topk, top_p, temperature, cache)

    def source_ids(self, sources: Sequence[str]) -> list[list[int]]:
        """``[CLS] src [SEP]`` token ids of each source string, tokenised as the pair data is
        (``conditional_data.tokenize_pairs``) and never cut: a source must leave room on the canvas for a
        target token and its [SEP], as every training source did."""
        if isinstance(sources, str) or not isinstance(sources, Sequence):
            raise UserError(f"sources must be a list of strings, got {type(sources).__name__}")
        if not sources:
            raise UserError("sources is empty: give at least one source string")
        for i, s in enumerate(sources):
            if not isinstance(s, str) or not s.strip():
                raise UserError(f"source {i} is {'empty' if isinstance(s, str) else type(s).__name__}, "
                                "not a non-empty string")
        tok, max_len = self.tokenizer, self.run.cfg.max_len
        words = tok(list(sources), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        ids = [[tok.cls_token_id, *w, tok.sep_token_id] for w in words]
        for i, x in enumerate(ids):
            if len(x) > max_len - 2:
                raise UserError(f"source {i} is {len(x)} tokens with [CLS] and [SEP]; the checkpoint's canvas holds "
                                f"max_len={max_len}, and a source may take at most {max_len - 2} to leave room for "
                                "the target")
        return ids

    def decode_batches(self, src_ids: Sequence[Sequence[int]], decoding: Decoding, seed: int = 42,
                       batch_size: int = 32, on_batch: Callable[[int], None] | None = None) -> Generated | None:
        """One output for every source (``[CLS] src [SEP]`` token ids), in batches of ``batch_size`` shared
        out among the ranks: on rank 0 a :class:`Generated` of ``recover`` strings, None on the others.

        A source sits on the canvas ``[CLS] src [SEP] | target`` of the checkpoint's max_len
        (``conditional_data.PairCollator``, given an empty target: the target region is noised whole, so
        what it held never matters). The source stays fixed; ``decoding.sample`` denoises the target region,
        and the generated padding decides the output's length (DiffuSeq style).
        """
        from conditional_data import PairCollator
        from evaluation.seq2seq import decode_like_diffuseq
        self._at_least_one(batch_size=batch_size)
        tok, device = self.tokenizer, self.device
        rows = [{"src_ids": list(x), "trg_ids": []} for x in src_ids]
        collate = PairCollator(tok.pad_token_id, canvas_len=self.run.cfg.max_len)

        def decode_batch(b: int, gen: torch.Generator):
            """Batch b: (recover strings, network calls, sequence evaluations)."""
            batch = collate(rows[b * batch_size:(b + 1) * batch_size])
            ids, att, noise = (batch[k].to(device) for k in ("input_ids", "attention_mask", "noise_mask"))
            out = decoding.sample(ids, att, noise, gen)
            recovers = [decode_like_diffuseq(tok, row[src_len:])
                        for row, src_len in zip(out.x0.cpu(), batch["src_len"].tolist())]
            return recovers, out.network_calls, out.row_evaluations

        with flush_denormal(device):
            results = dist.map_batches(-(-len(rows) // batch_size), decode_batch, self.info, seed, on_batch=on_batch)
        if results is None:  # not rank 0
            return None
        return Generated([h for recovers, _, _ in results for h in recovers], sum(r[1] for r in results),
                         sum(r[2] for r in results))

    def decode(self, sources: Sequence[str], *, steps: int | None = None, respacing=None, seed: int = 42,
               batch_size: int = 32, sampler: str = "ours", topk: int = 0, top_p: float = 1.0,
               temperature: float = 1.0, cache: bool = True) -> list[str]:
        """One output string per source from a seq2seq checkpoint (the ``recover`` fields that
        predict_downstream_condition.py writes to ``seed<seed>.jsonl`` for these sources).

        Absorbing (DiffusionBERT): ``steps`` iterations over a grid of 0..T (default 200, at most T), with
        ``sampler`` (``released``: DiffusionBERT's conditional sampler, which also redraws every target
        position at the last step), ``topk``/``top_p``/``temperature`` and ``cache`` as in :meth:`sample`.
        Gaussian (DiffuSeq): the steps of ``respacing`` (``full``, the default; ``uniform_N``; ``adp_N``, Tang
        et al.'s adaptive decay; or a comma-separated list), with clamping; the absorbing options are
        refused. The output depends on ``seed`` and ``batch_size``. Under a torchrun ``info``, ranks other
        than 0 get None.
        """
        decoding = self.decoding(steps, respacing, sampler, topk, top_p, temperature, cache)
        out = self.decode_batches(self.source_ids(sources), decoding, seed, batch_size)
        return None if out is None else out.texts


# ---------------------------------------------------------------------------- per-process decoding
def absorbing_decoding(m: Model, steps, respacing, sampler, topk, top_p, temperature, cache) -> Decoding:
    """DiffusionBERT: ``steps`` iterations (default 200) with ``sampler``, its filters and the cache."""
    n, run = m._name, m.run
    if respacing is not None or m.weights != "ema":
        raise UserError(f"{n('respacing')} and {n('weights')} are for gaussian (DiffuSeq) checkpoints; "
                        f"an absorbing checkpoint takes {n('steps')}")
    steps = 200 if steps is None else steps
    m._at_least_one(steps=steps)
    run.check_steps(steps, n("steps"))
    use_cache = cache and run.denoiser.time_agnostic

    def sample(ids, att, noise, gen):
        return run.diffusion.sample(run.denoiser, ids, noise, att, steps, topk, top_p, temperature, cache=use_cache,
                                    generator=gen, sampler=sampler, final_x0=sampler == "released")
    return Decoding(f"steps{steps}", steps, use_cache, sample)


def gaussian_decoding(m: Model, steps, respacing, sampler, topk, top_p, temperature, cache) -> Decoding:
    """DiffuSeq: the steps of ``respacing``, with clamping; the absorbing sampler's options are refused."""
    n, run = m._name, m.run
    if steps is not None:
        raise UserError(f"{run.ckpt_dir} is a gaussian (DiffuSeq) checkpoint: choose its steps with "
                        f"{m._setting('respacing', f'uniform_{steps}')} (or adp_N, full), not {n('steps')}")
    if topk or top_p != 1.0 or temperature != 1.0 or not cache or sampler != "ours":
        raise UserError(f"{n('topk')}, {n('top_p')}, {n('temperature')}, {n('sampler')} and {n('cache=False')} are "
                        "absorbing-sampler flags; a gaussian checkpoint samples with clamping")
    try:
        grid = run.diffusion.timesteps(respacing)
    except (ValueError, TypeError) as e:
        raise UserError(f"{n('respacing')}: {e}") from e
    kept = grid[:-1].flip(0).tolist()  # the kept steps, ascending

    def sample(ids, att, noise, gen):
        return run.diffusion.sample(run.denoiser, ids, noise, kept, generator=gen)
    return Decoding(f"respacing{respacing or 'full'}", None, False, sample, {"timesteps": kept})


DECODINGS = {"absorbing": absorbing_decoding, "gaussian": gaussian_decoding}
