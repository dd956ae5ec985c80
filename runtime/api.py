"""Sampling from a trained checkpoint in Python: load it once, then ask for strings.

    from runtime.api import load
    m = load("outputs/demo/checkpoints/best")      # a checkpoint directory, or a run directory (its best)
    m.sample(8, steps=128)                          # an lm checkpoint: 8 strings
    m.sample(4, length=[8, 12], prompt="in the beginning")    # sample i has length[i % 2] wordpieces
    m.infill(["the [MASK] [MASK] of the lord [MASK]"], num_samples=3)   # only the [MASK]s are generated
    m.sample(8, respacing="adp_20")                 # a gaussian (Diffusion-LM) lm: its steps are a respacing
    m.decode(["a source", "another"], steps=200)    # an absorbing seq2seq checkpoint: one string per source
    m.decode(sources, respacing="adp_20")           # a gaussian (DiffuSeq) one

Every request is a canvas of token ids with some positions fixed and the others generated
(``runtime.canvas``: a length, a prompt, a template and a seq2seq source are all rows of it), and one
function per process (:class:`Decoding`, ``sample(ids, attention_mask, noise_mask, generator)``) generates
the noised positions and never changes the fixed ones: the absorbing process never masks them, the Gaussian
one resets them to their embeddings after every step. :meth:`Model.generate` runs the batches.

* lm, absorbing (DiffusionBERT): ``[CLS] [MASK]*n [SEP]``; n is ``length`` or drawn from the training
  lengths (with a prompt: conditioned on being longer than the prompt), over a grid of ``steps``. A ``length``
  above max_len - 2 is made semi-autoregressively, in blocks of ``block_size`` (``runtime.semi_ar``).
* lm, gaussian (Diffusion-LM, DiffuSeq's network): a canvas of the checkpoint's max_len, ``[CLS]`` and then all noised, so the
  model places [SEP] and the padding; with a ``length`` the [SEP] and [PAD]s are fixed, and then a generated
  position never becomes a special token (clamping skips them), so the text has exactly that many
  wordpieces. Steps: ``respacing``.
* seq2seq: ``[CLS] src [SEP]`` (the run's ``--canvas released``: ``[CLS] prompt(src)``) fixed and the rest of
  the canvas, the checkpoint's max_len, generated (:meth:`Model.decode`).
* a template: ``[CLS] template [SEP]``, fixed except its [MASK]s; one with no [MASK] is its own output
  (its tokenisation decoded), without a network call.

``predict.py`` and ``predict_downstream_condition.py`` sample through this object, so for the same
checkpoint, settings, ``seed`` and ``batch_size``, ``sample`` returns the lines of predict.py's file and
``decode`` the ``recover`` fields of the decoder's ``seed<k>.jsonl`` (for the sources that the pair data
left uncut: ``decode`` never cuts one, and refuses one longer than max_len - 2): DiffuSeq's strings, the generated
target region with its [SEP] kept and its trailing [PAD]s dropped (``evaluation.seq2seq.strip_special``
removes the special tokens as the metrics do). An lm text is the wordpieces between [CLS] and its [SEP]
(gaussian, open-ended: the first generated [SEP] or [PAD]) decoded without special tokens, single-spaced.
Row i draws its random numbers from (seed, i) (``diffusion.noise.SampleNoise``): the same call gives the same
strings again, on any number of ranks and with any ``batch_size`` (up to floating-point ties of the network's
output across batch shapes; docs/running.md, "Batch-size invariance").

A bad request is a ``UserError`` of one line that names the keyword argument. The scripts' checks are
these same ones, naming the scripts' flags instead (``load(..., flags=True)``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from diffusion import GAUSSIAN_SOLVERS, SAMPLERS, SampleNoise, SampleOutput, make_sampler
from runtime import dist, semi_ar
from runtime.assemble import WEIGHTS, Loaded, load_for_inference
from runtime.canvas import SLOT, Row, lay_out, template_cells, text_end, word_start_mask, wordpieces
from common import heap
from common.errors import UserError

# the scripts' flag for an option whose flag is not --<keyword>
FLAGS = {"respacing": "--decode_respacing", "cache=False": "--no_cache", "templates": "--template"}
# the sampler's options (keyword arguments of sample/infill/decode; the scripts' flags of the same names)
SAMPLER_OPTIONS = ("order", "threshold", "remask", "eta")
# absorbing: the default number of steps of each task (predict.py's and predict_downstream_condition.py's)
DEFAULT_STEPS = {"lm": 128, "seq2seq": 200}


@dataclass
class Decoding:
    """How a checkpoint generates, checked against it (``Model.decoding``; one per process in ``DECODINGS``)."""
    setting: str                                 # in the decoder's default output folder name
    steps: int | None                            # absorbing: iterations; gaussian: None (see report)
    use_cache: bool
    sample: Callable[..., SampleOutput]          # (ids, attention_mask, noise_mask, noise, restrict) -> SampleOutput
    report: dict = field(default_factory=dict)   # extra keys of decode.json / predict.py's json
    summary: str = ""                            # how it ran, for the scripts' last line ("cache on", "20 steps")
    notes: tuple[str, ...] = ()                  # what the scripts log before sampling (a setting not honoured)


@dataclass(frozen=True)
class Traits:
    """What a process's generation can do, where the rows, checks and readings differ by process (one entry per
    process in ``TRAITS``, beside its ``DECODINGS`` entry): the API asks these, never the process's name."""
    diffusion_steps: bool    # the checkpoint has T diffusion steps (not the left-to-right baseline)
    fixed_lm_canvas: bool    # an lm row is a --max_len canvas where the model places [SEP] (gaussian); else as long
                             # as its text (absorbing), or a prefix continued until [SEP] (autoregressive)
    semi_ar: bool            # lengths past max_len are made block by block (runtime.semi_ar)
    left_to_right: bool      # continues a prefix only: no lengths, no templates, no blocks
    cut_at_sep: bool         # a seq2seq output ends at its first [SEP] (DiffusionBERT's decoder), else DiffuSeq's
                             # whole generated region
    start_id: bool           # the released sampler's start token can be chosen


@dataclass
class Generated:
    """What ``Model.generate`` gives on rank 0: the strings and what they cost."""
    texts: list[str]           # one per row (sample, template sample, source), in order
    network_calls: int         # batched denoiser invocations, summed over the batches
    row_evaluations: int       # sequences passed through the denoiser, summed over the calls
    canvases: list[list[int]] = field(default_factory=list)  # each row's generated canvas (token ids)
    blocks: list[int] = field(default_factory=list)    # canvases sampled per row: 1, or its semi-AR blocks


def load(path: str, device: str | torch.device = "auto", *, weights: str = "ema", prefer: str = "best",
         task: str | None = None, info: dist.DistInfo | None = None, flags: bool = False) -> Model:
    """Load a checkpoint directory, or a run directory (its ``checkpoints/<prefer>``), for sampling.

    ``device``: ``auto`` (cuda if there is one, else cpu) or a torch device. ``weights``: what a gaussian
    checkpoint decodes with, ``ema`` (as DiffuSeq; the default) or ``raw``; an absorbing checkpoint has
    one set and refuses ``raw``. ``task`` (``lm``/``seq2seq``): refuse a checkpoint of the other
    task, with the message that names the other script; None takes the checkpoint's task. ``info``: the
    scripts' ``dist.DistInfo`` under torchrun (the batches are shared out among the ranks and only rank 0
    gets the strings), in place of ``device``. ``flags``: the checks name the scripts' flags (``--steps``).
    """
    if weights not in WEIGHTS:
        raise UserError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if info is None:
        info = dist.DistInfo(device=dist.pick_device(device, flag="device"))
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

    @property
    def traits(self) -> Traits:
        return TRAITS[self.process]

    @property
    def canvas_width(self) -> int | None:
        """The checkpoint's max_len for the fixed canvases it was trained on (seq2seq, gaussian); None for the
        absorbing lm, whose batches are as long as their longest row (``runtime.canvas``)."""
        variable = self.task == "lm" and self.traits.semi_ar
        return None if variable else self.run.cfg.max_len

    def __repr__(self) -> str:
        steps = f"T={self.run.cfg.num_steps}, " if self.traits.diffusion_steps else ""
        return (f"Model({self.run.ckpt_dir!r}: {self.task}, {self.process}, {steps}"
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

    def _need_task(self, task: str, method: str) -> None:
        if self.task == task:
            return
        if task == "lm":
            raise UserError(f"{self.run.ckpt_dir} is a {self.task} checkpoint: {method}() is for lm checkpoints; "
                            "give it sources with decode()")
        raise UserError(f"{self.run.ckpt_dir} is an {self.task} checkpoint: decode() is for seq2seq checkpoints; "
                        "draw from it with sample()")

    def _lengths(self, length, longest: int, blocks: bool = False) -> list[int] | None:
        """``length`` (an int or a list of them) as a list, each between 1 and ``longest`` (with ``blocks``, any
        positive count: a longer one is made semi-autoregressively)."""
        if length is None:
            return None
        values = [length] if isinstance(length, int) else length
        if (isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
            raise UserError(f"{self._name('length')} must be a number of wordpieces or a list of them, got {length!r}")
        for v in values:
            if v < 1 and blocks:
                raise UserError(f"{self._name('length')} must be at least 1 (above {longest}, {self._name('max_len')} "
                                f"minus [CLS] and [SEP], it is made semi-autoregressively), got {v}")
            if v < 1 or (v > longest and not blocks):
                also = (" (a gaussian checkpoint has no semi-autoregressive mode past its canvas)"
                        if self.traits.fixed_lm_canvas and v > longest else "")
                raise UserError(f"{self._name('length')} must be between 1 and {longest} ({self._name('max_len')} "
                                f"minus [CLS] and [SEP]){also}, got {v}")
        return list(values)

    def _blocks(self, lengths: list[int] | None, block_size: int | None, longest: int,
                given: int) -> tuple[int, int] | None:
        """``(W, b)`` for the rows longer than ``longest`` (``runtime.semi_ar``: W the window, the longest training
        line up to ``longest``; b ``block_size``, default W // 2), None if every row fits one canvas."""
        n = self._name
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)):
            raise UserError(f"{n('block_size')} must be a number of wordpieces, got {block_size!r}")
        if not lengths or max(lengths) <= longest:
            if block_size is not None:
                raise UserError(f"{n('block_size')} is for semi-autoregressive sampling, a {n('length')} above "
                                f"{longest} ({n('max_len')} minus [CLS] and [SEP]) on an absorbing checkpoint; "
                                "every sample here fits one canvas")
            return None
        counts = self.run.run_info.get("derived", {}).get("length_counts") or []
        trained = max((i for i, c in enumerate(counts) if c), default=longest)
        window = min(longest, trained)
        b = max(1, window // 2) if block_size is None else block_size
        if not 1 <= b < window:
            raise UserError(f"{n('block_size')} must be between 1 and {window - 1}, got {b}: a block's canvas is "
                            f"[CLS], {window} wordpieces (the longest training line) and [SEP], and at least one "
                            "of them must be context")
        if given > window - b:
            raise UserError(f"{n('prompt')} is {given} wordpieces, longer than the context a block sees: "
                            f"{window - b} ({window} wordpieces a canvas, minus {n('block_size')} {b}); shorten "
                            f"the prompt or lower {n('block_size')}")
        return window, b

    # ------------------------------------------------------------------------ how: one function per process
    def decoding(self, steps: int | None = None, respacing=None, sampler: str = "ours", topk: int = 0,
                 top_p: float = 1.0, temperature: float = 1.0, cache: bool = True, start_id: int | None = None, *,
                 order: str | None = None, threshold: float | None = None, remask: str | None = None,
                 eta: float | None = None, solver: str | None = None) -> Decoding:
        """Check generation settings against this checkpoint (see :meth:`sample` and :meth:`decode`).
        ``start_id``: absorbing with the released sampler only, the token the chain starts from instead of
        [MASK] (103 is the released seq2seq decoder's, whatever the tokenizer). ``order``, ``threshold``,
        ``remask``, ``eta``: the sampler's options (:func:`diffusion.make_sampler`); ``solver``: gaussian."""
        self._check_filters(sampler, topk, top_p, temperature)
        options = {"order": order, "threshold": threshold, "remask": remask, "eta": eta}
        if start_id is not None:
            n = self._name
            if not self.traits.start_id or sampler != "released":
                raise UserError(f"{n('start_id')} is for absorbing checkpoints with {n('sampler')} released (the "
                                "released decoder's start token)")
            if not 0 <= start_id < len(self.tokenizer):
                raise UserError(f"{n('start_id')} must be a token id of the checkpoint's tokenizer (0 to "
                                f"{len(self.tokenizer) - 1}), got {start_id}")
            d = DECODINGS[self.process](self, steps, respacing, sampler, topk, top_p, temperature, cache, options,
                                        solver)
            return dataclasses.replace(d, setting=f"{d.setting}_start{start_id}", report={**d.report, "start_id": start_id},
                                       sample=lambda ids, att, noise, gen, restrict=None: d.sample(
                                           ids, att, noise, gen, restrict, start_id=start_id))
        return DECODINGS[self.process](self, steps, respacing, sampler, topk, top_p, temperature, cache, options,
                                       solver)

    @property
    def continuation_tokens(self) -> torch.Tensor:
        """[V] bool over the denoiser's vocabulary: the tokenizer's continuation pieces (``##...``)."""
        den = self.run.denoiser
        V = den.vocab_size if hasattr(den, "vocab_size") else den.embedding_weight.shape[0]
        mask = torch.zeros(V, dtype=torch.bool)
        ids = [i for piece, i in self.tokenizer.get_vocab().items() if piece.startswith("##") and i < V]
        mask[ids] = True
        return mask

    # ------------------------------------------------------------------------ what: canvas rows
    def lm_rows(self, num_samples: int, length=None, prompt: str | None = None, max_len: int | None = None,
                seed: int = 42, block_size: int | None = None) -> list[Row]:
        """The canvas rows of :meth:`sample` (``runtime.canvas``), one per sample; a row longer than max_len - 2
        (absorbing) is made in blocks (``runtime.semi_ar``)."""
        self._need_task("lm", "sample")
        self._at_least_one(num_samples=num_samples)
        n, tok, cfg = self._name, self.tokenizer, self.run.cfg
        traits = self.traits
        if max_len is not None:
            if traits.fixed_lm_canvas:
                raise UserError(f"{n('max_len')} is for absorbing checkpoints: a gaussian lm samples on its canvas "
                                f"of max_len={cfg.max_len}; choose a length with {n('length')}")
            if not 3 <= max_len <= cfg.max_len:
                raise UserError(f"{n('max_len')} must be between 3 and the training --max_len {cfg.max_len}, "
                                f"got {max_len}")
        if traits.left_to_right and (length is not None or max_len is not None or block_size is not None):
            raise UserError(f"{n('length')}, {n('max_len')} and {n('block_size')} are for diffusion checkpoints: an "
                            f"autoregressive one ends a sample where it draws [SEP] (at the latest at its "
                            f"max_len={cfg.max_len})")
        if block_size is not None and not traits.semi_ar:
            raise UserError(f"{n('block_size')} is for absorbing checkpoints: a gaussian lm samples one canvas of "
                            f"max_len={cfg.max_len}")
        longest = (max_len or cfg.max_len) - 2
        lengths = self._lengths(length, longest, blocks=traits.semi_ar)
        given = [] if prompt is None else wordpieces(tok, prompt, n("prompt"), slots=False)
        blocks = self._blocks(lengths, block_size, longest, len(given))
        room = longest if lengths is None else min(lengths)
        if len(given) >= room:
            where = (f"{n('length')} {room} (which counts the prompt's wordpieces)" if lengths else
                     f"the canvas, at most {longest} between [CLS] and [SEP]")
            raise UserError(f"{n('prompt')} {prompt!r} is {len(given)} wordpieces: {where} leaves no room to continue it")
        if traits.left_to_right:  # from [CLS] (and the prompt) until [SEP]
            return [Row((tok.cls_token_id, *given), open=True)] * num_samples
        if lengths is None and not traits.fixed_lm_canvas:
            from textdata.lm import LengthPrior
            counts = self.run.run_info["derived"]["length_counts"]
            try:  # longer than the prompt: the training-length prior conditioned on n > |prompt|
                lengths = LengthPrior(counts).sample(num_samples, longest, torch.Generator().manual_seed(seed),
                                                     min_n=len(given) + 1).tolist()
            except UserError as e:
                raise UserError(f"{e}; give {n('length')}") from e
        cls, sep = tok.cls_token_id, tok.sep_token_id
        if lengths is None:  # a fixed canvas, open-ended: the model places [SEP] and the padding
            return [Row((cls, *given), open=True)] * num_samples
        return [Row((cls, *given, *[SLOT] * (m - len(given)), sep), blocks=blocks if m > longest else None)
                for m in (lengths[i % len(lengths)] for i in range(num_samples))]

    def template_rows(self, templates: Sequence[str], num_samples: int = 1, length=None) -> list[Row]:
        """The canvas rows of :meth:`infill`: ``[CLS] template [SEP]`` with its [MASK]s generated, ``num_samples``
        rows per template (template-major)."""
        self._need_task("lm", "infill")
        self._at_least_one(num_samples=num_samples)
        n, tok, max_len = self._name, self.tokenizer, self.run.cfg.max_len
        if self.traits.left_to_right:
            raise UserError(f"{self.run.ckpt_dir} is an autoregressive checkpoint: it generates left to right and "
                            f"cannot fill a {n('templates')}'s slots given the words after them; give a "
                            f"{n('prompt')} (the text it continues) instead")
        if isinstance(templates, str) or not isinstance(templates, Sequence):
            raise UserError(f"{n('templates')} must be a list of strings, got {type(templates).__name__}")
        if not templates:
            raise UserError(f"{n('templates')} is empty: give at least one template")
        if tok.mask_token_id is None:
            raise UserError(f"the tokenizer of {self.run.ckpt_dir} has no mask token to mark a template's slots")
        lengths = self._lengths(length, max_len - 2)
        rows = []
        for i, text in enumerate(templates):
            cells, starts = template_cells(tok, text, f"template {i}")
            if len(cells) > max_len - 2:
                raise UserError(f"template {i} is {len(cells)} wordpieces; the checkpoint's canvas holds max_len="
                                f"{max_len}, so a template may take at most {max_len - 2} besides [CLS] and [SEP]")
            if lengths and any(v != len(cells) for v in lengths):
                raise UserError(f"{n('length')} {','.join(map(str, lengths))} conflicts with template {i}, which is "
                                f"{len(cells)} wordpieces (a template's tokens and {tok.mask_token}s fix its length)")
            rows += [Row((tok.cls_token_id, *cells, tok.sep_token_id), word_starts=starts)] * num_samples
        return rows

    def source_ids(self, sources: Sequence[str]) -> list[list[int]]:
        """The source cells of each string on the checkpoint's canvas (``[CLS] src [SEP]``, or with
        ``--canvas released`` DiffusionBERT's ``[CLS] prompt(src)``), tokenised as the pair data is
        (``conditional_data.source_ids``) and never cut: a source must leave room on the canvas for a
        target token and its [SEP], as every training source did."""
        if isinstance(sources, str) or not isinstance(sources, Sequence):
            raise UserError(f"sources must be a list of strings, got {type(sources).__name__}")
        if not sources:
            raise UserError("sources is empty: give at least one source string")
        for i, s in enumerate(sources):
            if not isinstance(s, str) or not s.strip():
                raise UserError(f"source {i} is {'empty' if isinstance(s, str) else type(s).__name__}, "
                                "not a non-empty string")
        from conditional_data import source_ids
        cfg = self.run.cfg
        max_len = cfg.max_len
        ids = source_ids(self.tokenizer, list(sources), cfg.canvas, cfg.dataset)
        for i, x in enumerate(ids):
            if len(x) > max_len - 2:
                with_ = "with [CLS] and [SEP]" if cfg.canvas == "ours" else "with [CLS] and the prompt"
                raise UserError(f"source {i} is {len(x)} tokens {with_}; the checkpoint's canvas holds "
                                f"max_len={max_len}, and a source may take at most {max_len - 2} to leave room for "
                                "the target")
        return ids

    @staticmethod
    def source_rows(src_ids: Sequence[Sequence[int]]) -> list[Row]:
        """The source cells (``[CLS] src [SEP]``, or ``[CLS] prompt(src)``) fixed, the rest of the canvas generated
        (``conditional_data.PairCollator`` with an empty target: what the target region held never matters, it is
        noised whole)."""
        return [Row(tuple(x), open=True) for x in src_ids]

    # ------------------------------------------------------------------------ the one loop
    def _read(self, row: Row, x0: list[int]) -> str:
        """The string of a generated canvas row (module docstring)."""
        tok = self.tokenizer
        if self.task == "seq2seq":
            from evaluation.seq2seq import decode_like_diffuseq
            # DiffusionBERT's decoder cuts at the first end token (kept, as DiffuSeq's strings keep it)
            end = text_end(row, x0, (tok.sep_token_id,)) + 1 if self.traits.cut_at_sep else len(x0)
            return decode_like_diffuseq(tok, x0[len(row.cells):end])
        end = text_end(row, x0, (tok.sep_token_id, tok.pad_token_id))
        return " ".join(tok.decode(x0[1:end], skip_special_tokens=True).split())

    def generate(self, rows: Sequence[Row], decoding: Decoding, seed: int = 42, batch_size: int = 32,
                 on_batch: Callable[[int], None] | None = None, store=None) -> Generated | None:
        """Generate the canvas ``rows`` with ``decoding``, in batches of ``batch_size`` shared out among the
        ranks: on rank 0 a :class:`Generated` in row order, None on the others. ``on_batch(n)``: called after
        each of this rank's batches. ``store`` (``runtime.outputs.BatchStore``): keeps each finished batch on
        disk and gives back those an interrupted run kept (``dist.map_batches``).

        On the absorbing lm's canvas (no fixed width) rows of similar lengths share a batch (little padding);
        other canvases keep the rows' order. A batch with a row longer than a canvas (``Row.blocks``) is made
        block by block (``runtime.semi_ar.generate``); ``Generated.blocks`` counts each row's canvases. A row with nothing to generate (a template without [MASK]) is its
        own output and never reaches the network.
        """
        self._at_least_one(batch_size=batch_size)
        tok, device, width = self.tokenizer, self.device, self.canvas_width
        work = [i for i, r in enumerate(rows) if r.generates]
        if width is None:
            work.sort(key=lambda i: len(rows[i].cells))  # stable
        fill = tok.mask_token_id if tok.mask_token_id is not None else tok.pad_token_id

        continuation = None

        def generate_batch(b: int, gen: torch.Generator):
            """Batch b: ([[row index, text, canvas], ...], network calls, sequence evaluations): JSON as it is. The
            draws of row i are those of (seed, i) (``diffusion.noise.SampleNoise``), whatever batch it is in."""
            nonlocal continuation
            idx = work[b * batch_size:(b + 1) * batch_size]
            batch = [rows[i] for i in idx]
            if any(r.blocks for r in batch):  # longer than a canvas: block by block (runtime.semi_ar)
                made, calls, evaluations = semi_ar.generate(batch, idx, decoding.sample, seed, device,
                                                            tok.pad_token_id, fill)
                heap.give_back()
                return [[i, self._read(rows[i], x0), x0] for i, x0 in zip(idx, made)], calls, evaluations
            ids, att, noise = (x.to(device) for x in lay_out(batch, tok.pad_token_id, fill, width))
            where, restrict = word_start_mask(batch, ids.shape[1]), None
            if where is not None:
                continuation = self.continuation_tokens if continuation is None else continuation
                restrict = (where.to(device), continuation.to(device))
            out = decoding.sample(ids, att, noise, SampleNoise(seed, idx, device), restrict)
            done = [[i, self._read(rows[i], x0), x0] for i, x0 in zip(idx, out.x0.cpu().tolist())]
            heap.give_back()  # this batch's freed tensors leave the heap: the RSS stays flat (common/heap.py)
            return done, out.network_calls, out.row_evaluations

        # the fixed canvases run as the decoder always has (flush_denormal); the absorbing lm as predict.py has
        with flush_denormal(device) if width is not None else contextlib.nullcontext():
            results = dist.map_batches(-(-len(work) // batch_size), generate_batch, self.info, seed, on_batch=on_batch,
                                       store=store)
        if results is None:  # not rank 0
            return None
        done = {i: (text, x0) for batch, _, _ in results for i, text, x0 in batch}
        for i, r in enumerate(rows):
            if not r.generates:
                done[i] = (self._read(r, list(r.cells)), list(r.cells))
        return Generated([done[i][0] for i in range(len(rows))], sum(r[1] for r in results),
                         sum(r[2] for r in results), [done[i][1] for i in range(len(rows))],
                         [len(semi_ar.spans(r)) if r.generates else 0 for r in rows])

    # ------------------------------------------------------------------------ the requests
    def sample(self, num_samples: int, *, steps: int | None = None, respacing=None, seed: int = 42,
               batch_size: int = 32, sampler: str = "ours", topk: int = 0, top_p: float = 1.0,
               temperature: float = 1.0, length=None, prompt: str | None = None, max_len: int | None = None,
               cache: bool = True, block_size: int | None = None, **options) -> list[str]:
        """``num_samples`` strings from an lm checkpoint (predict.py's lines for the same arguments).

        Absorbing: ``steps`` iterations over a grid of 0..T (default 128, at most T). ``sampler``: ``ours``
        (``topk``/``top_p``/``temperature`` filter p_hat, then the exact reverse step) or ``released``
        (DiffusionBERT's: they filter the posterior logits). ``cache``: reuse p_hat for rows that did not change
        (only where the denoiser ignores t; the strings are the same either way). ``max_len``: the longest
        sample with [CLS]/[SEP] (default: the training max_len).
        Gaussian: the steps of ``respacing`` (``full``, the default; ``uniform_N``; ``adp_N``; or a list), with
        clamping; the absorbing options are refused.

        ``length``: wordpieces between [CLS] and [SEP], an int or a list (sample i gets ``length[i % len]``);
        default: absorbing, drawn from the training lengths; gaussian, where the model puts [SEP].
        ``prompt``: every sample starts with these wordpieces (counted in ``length``); without a length,
        absorbing lengths are drawn from the training lengths longer than the prompt.
        ``options``: the sampler's (``order``, ``threshold``, ``remask``, ``eta``; :func:`diffusion.make_sampler`)
        or, gaussian, ``solver`` (``ddpm``, the default; ``ddim``; ``dpm_solver++``).
        Absorbing, a ``length`` above ``max_len`` - 2 is made semi-autoregressively (``runtime.semi_ar``): the
        first canvas, then blocks of ``block_size`` new wordpieces (default half the window), each conditioned
        on the last wordpieces made, with any sampler; ``block_size`` without such a length is refused.
        Sample i depends on (checkpoint, ``seed``, i, settings), not on ``batch_size`` (docs/running.md: up to
        floating-point ties). Under a torchrun ``info``, ranks other than 0 get None.
        """
        rows = self.lm_rows(num_samples, length, prompt, max_len, seed, block_size)
        out = self.generate(rows, self.decoding(steps, respacing, sampler, topk, top_p, temperature, cache, **options),
                            seed, batch_size)
        return None if out is None else out.texts

    def infill(self, templates: Sequence[str], *, num_samples: int = 1, length=None, steps: int | None = None,
               respacing=None, seed: int = 42, batch_size: int = 32, sampler: str = "ours", topk: int = 0,
               top_p: float = 1.0, temperature: float = 1.0, cache: bool = True, **options) -> list[str]:
        """Fill in the [MASK]s of each template (an lm checkpoint): ``num_samples`` strings per template,
        template-major. Every other wordpiece of a template stays as the checkpoint's tokenizer gives it, at every
        step; a template without [MASK] comes back as its own tokenisation, decoded. ``length`` is only a check:
        it must equal each template's wordpiece count. A slot that begins a word (after a space, or first) never
        takes a continuation piece (``##...``); write ``word[MASK]`` to let it continue the word. The other options
        are :meth:`sample`'s.
        """
        rows = self.template_rows(templates, num_samples, length)
        out = self.generate(rows, self.decoding(steps, respacing, sampler, topk, top_p, temperature, cache, **options),
                            seed, batch_size)
        return None if out is None else out.texts

    def decode_batches(self, src_ids: Sequence[Sequence[int]], decoding: Decoding, seed: int = 42,
                       batch_size: int = 32, on_batch: Callable[[int], None] | None = None,
                       store=None) -> Generated | None:
        """One ``recover`` string for every source (``[CLS] src [SEP]`` token ids): :meth:`generate` of
        :meth:`source_rows` on the checkpoint's canvas; the generated padding decides the output's length
        (DiffuSeq style)."""
        return self.generate(self.source_rows(src_ids), decoding, seed, batch_size, on_batch, store)

    def decode(self, sources: Sequence[str], *, steps: int | None = None, respacing=None, seed: int = 42,
               batch_size: int = 32, sampler: str = "ours", topk: int = 0, top_p: float = 1.0,
               temperature: float = 1.0, cache: bool = True, **options) -> list[str]:
        """One output string per source from a seq2seq checkpoint (the ``recover`` fields that
        predict_downstream_condition.py writes to ``seed<seed>.jsonl`` for these sources).

        Absorbing (DiffusionBERT): ``steps`` iterations over a grid of 0..T (default 200, at most T), with
        ``sampler`` (``released``: DiffusionBERT's conditional sampler, which also redraws every target
        position at the last step), ``topk``/``top_p``/``temperature`` and ``cache`` as in :meth:`sample`.
        Gaussian (DiffuSeq): the steps of ``respacing`` (``full``, the default; ``uniform_N``; ``adp_N``, Tang
        et al.'s adaptive decay; or a comma-separated list), with clamping; the absorbing options are
        refused; ``options`` as in :meth:`sample`. Output i depends on (checkpoint, ``seed``, i, settings). Under a
        torchrun ``info``, ranks other than 0 get None.
        """
        self._need_task("seq2seq", "decode")
        decoding = self.decoding(steps, respacing, sampler, topk, top_p, temperature, cache, **options)
        out = self.decode_batches(self.source_ids(sources), decoding, seed, batch_size)
        return None if out is None else out.texts


# ---------------------------------------------------------------------------- per-process decoding
def default_steps(m: Model) -> int:
    """The task's default number of absorbing steps, or T where the checkpoint has fewer (one note saying so)."""
    steps, T = DEFAULT_STEPS[m.task], m.run.cfg.num_steps
    if steps > T:
        if m.info.is_main:
            print(f"note: {m._name('steps')} defaults to {steps}, more than the checkpoint's T={T} diffusion steps; "
                  f"sampling with {T}", file=sys.stderr, flush=True)
        steps = T
    return steps


def absorbing_decoding(m: Model, steps, respacing, sampler, topk, top_p, temperature, cache, options,
                       solver=None) -> Decoding:
    """DiffusionBERT: ``steps`` iterations (default 128 for lm, 200 for seq2seq) with ``sampler`` (its ``options``),
    its filters and the cache. The released seq2seq sampler also redraws every target position at the last step."""
    n, run = m._name, m.run
    if respacing is not None or m.weights != "ema":
        raise UserError(f"{n('respacing')} and {n('weights')} are for gaussian (DiffuSeq) checkpoints; "
                        f"an absorbing checkpoint takes {n('steps')}")
    if solver is not None:
        raise UserError(f"{n('solver')} is for gaussian (DiffuSeq) checkpoints; an absorbing checkpoint decodes with "
                        f"{n('sampler')}")
    steps = default_steps(m) if steps is None else steps
    m._at_least_one(steps=steps)
    run.check_steps(steps, n("steps"))
    final_x0 = sampler == "released" and m.task == "seq2seq"
    try:
        rule = make_sampler(sampler, **options, final_x0=final_x0, names={k: n(k) for k in ("sampler", *SAMPLER_OPTIONS)})
        rule.check(run.diffusion)
    except ValueError as e:
        raise UserError(f"{n('sampler')} {sampler}: {e}") from e
    use_cache = cache and run.denoiser.time_agnostic

    def sample(ids, att, noise, gen, restrict=None, start_id=None):
        return run.diffusion.sample(run.denoiser, ids, noise, att, steps, topk, top_p, temperature, cache=use_cache,
                                    generator=gen, sampler=rule, start_id=start_id, restrict=restrict)
    report = {k: getattr(rule, k) for k in ("order", "threshold", "schedule", "eta") if hasattr(rule, k)}
    report = {("remask" if k == "schedule" else k): v for k, v in report.items()}
    notes = (() if use_cache or not cache else
             (f"the denoiser is conditioned on t ({run.cfg.time_conditioning}); caching is off",))
    return Decoding(f"steps{steps}{_setting_suffix(sampler, report)}", steps, use_cache, sample, report,
                    f"cache {'on' if use_cache else 'off'}", notes)


def _setting_suffix(sampler: str, report: dict) -> str:
    """What the decoder's folder name adds for a sampler other than ours and released (``_confidence-margin``)."""
    if sampler in ("ours", "released"):
        return ""
    return "_" + "-".join([sampler, *(str(v) for v in report.values())])


def gaussian_decoding(m: Model, steps, respacing, sampler, topk, top_p, temperature, cache, options,
                      solver=None) -> Decoding:
    """DiffuSeq: the steps of ``respacing`` with ``solver`` (``ddpm``, the default), with clamping; the absorbing
    sampler's options are refused. Rows whose end is fixed (the canvas's last position is not generated: a length
    or a template) clamp to words only (the special tokens are excluded from the clamping table); open rows (a
    source, an lm without a length) may generate [SEP] and [PAD]."""
    n, run = m._name, m.run
    if steps is not None:
        raise UserError(f"{run.ckpt_dir} is a gaussian (DiffuSeq) checkpoint: choose its steps with "
                        f"{m._setting('respacing', f'uniform_{steps}')} (or adp_N, full), not {n('steps')}")
    if (topk or top_p != 1.0 or temperature != 1.0 or not cache or sampler != "ours"
            or any(v is not None for v in options.values())):
        raise UserError(f"{n('topk')}, {n('top_p')}, {n('temperature')}, {n('sampler')} (and its options) and "
                        f"{n('cache=False')} are absorbing-sampler flags; a gaussian checkpoint samples with clamping "
                        f"and {n('solver')}")
    solver = solver or "ddpm"
    if solver not in GAUSSIAN_SOLVERS:
        raise UserError(f"{n('solver')} must be one of {', '.join(GAUSSIAN_SOLVERS)}, got {solver!r}")
    try:
        grid = run.diffusion.timesteps(respacing)
    except (ValueError, TypeError) as e:
        raise UserError(f"{n('respacing')}: {e}") from e
    kept = grid[:-1].flip(0).tolist()  # the kept steps, ascending
    special = tuple(m.tokenizer.all_special_ids)

    def sample(ids, att, noise, gen, restrict=None):
        closed = ~noise[:, -1]
        if bool(closed.any()) and not bool(closed.all()):
            raise ValueError("rows whose end is fixed and rows whose end is generated cannot share a batch")
        return run.diffusion.sample(run.denoiser, ids, noise, kept, generator=gen,
                                    exclude=special if bool(closed.all()) else (), solver=solver, restrict=restrict)
    suffix = "" if solver == "ddpm" else f"_{solver}"
    return Decoding(f"respacing{respacing or 'full'}{suffix}", None, False, sample,
                    {"timesteps": kept, "solver": solver}, f"{len(kept)} steps")


def autoregressive_decoding(m: Model, steps, respacing, sampler, topk, top_p, temperature, cache, options,
                            solver=None) -> Decoding:
    """The AR baseline: ancestral sampling left to right (``Autoregressive.sample``) with ``temperature``, ``topk``
    and ``top_p``; one network call per generated position, on the whole prefix (no key-value cache, so ``cache``
    changes nothing). The diffusion samplers' settings are refused."""
    n, run = m._name, m.run
    given = [n(k) for k, v in (("steps", steps), ("respacing", respacing), ("solver", solver), *options.items())
             if v is not None] + ([n("sampler")] if sampler != "ours" else []) + \
        ([n("weights")] if m.weights != "ema" else [])
    if given:
        raise UserError(f"{', '.join(given)}: diffusion sampler settings; an autoregressive checkpoint samples left to "
                        f"right, with {n('temperature')}, {n('top_p')} and {n('topk')}")
    den, pad_id = run.denoiser, m.tokenizer.pad_token_id

    def sample(ids, att, noise, gen, restrict=None):
        return run.diffusion.sample(lambda x, a, p: den(x, None, a, p), ids, noise, gen, topk, top_p, temperature,
                                    pad_id)
    return Decoding("autoregressive", None, False, sample, {"sampler": "autoregressive", "kv_cache": False},
                    "left to right, no key-value cache")


DECODINGS = {"absorbing": absorbing_decoding, "gaussian": gaussian_decoding, "autoregressive": autoregressive_decoding}
TRAITS = {
    "absorbing": Traits(diffusion_steps=True, fixed_lm_canvas=False, semi_ar=True, left_to_right=False,
                        cut_at_sep=True, start_id=True),
    "gaussian": Traits(diffusion_steps=True, fixed_lm_canvas=True, semi_ar=False, left_to_right=False,
                       cut_at_sep=False, start_id=False),
    "autoregressive": Traits(diffusion_steps=False, fixed_lm_canvas=False, semi_ar=False, left_to_right=True,
                             cut_at_sep=False, start_id=False),
}
