"""Seq2seq metrics and MBR selection, reproducing DiffuSeq's ``scripts/eval_seq2seq.py``.

Input: DiffuSeq-format output files, one JSON object per line with the keys ``recover``
(generated text), ``reference`` (gold target) and ``source``. Several files = several
candidates (seeds) per source, row k of every file belonging to source k. The strings are
DiffuSeq's (:func:`decode_like_diffuseq`: ``[CLS]``/``[SEP]`` kept, BERT's clean-up of
tokenization spaces applied); files written by our older decoder, without special tokens and
with ``i ' m`` spacing, are read the same way.

Conventions (those of DiffuSeq's current script, commit e44113d and later, so that numbers
are comparable):

* **Special tokens**: each text is ``.strip()``-ed *first*, then ``[SEP]``, ``[CLS]`` (and for
  ``recover`` also ``[PAD]``) are deleted with ``str.replace``. Nothing is normalised afterwards,
  so ``"[CLS] a b [SEP] [PAD]"`` becomes ``" a b  "``. Only ``avg_len`` sees the leftover spaces.
* **BLEU** of a pair is ``get_bleu(recover, reference) = sentence_bleu([reference.split()],
  recover.split(), method4)``: the generated text is the hypothesis. Self-BLEU and MBR use the
  same call on pairs of candidates: ``get_bleu(c_i, c_j)`` has ``c_j`` as the reference.
* **Reversed order** (``order="reversed"``): ``sentence_bleu([recover.split()],
  reference.split())``, the generated text in the reference slot, as in DiffuSeq's first release
  (commit 8bfafcb) and DiffusionBERT's ``compute_metric.py``. Reported as ``bleu_reversed`` and
  ``self_bleu_reversed``; ``mbr_select(..., order="reversed")`` chooses with it.
* **ROUGE-L**: torchmetrics ``rougeL_fmeasure`` of ``(recover, reference)`` per sentence.
* **dist-1**: per sentence unique/total whitespace unigrams, 0 for an empty sentence (it is
  counted, not skipped); **avg_len**: ``len(recover.split(' '))`` (single-space split, so the
  gaps left by removed special tokens count); ``avg_len_words`` uses ``str.split()``.
* **self-BLEU** per source: mean over candidate pairs i < j of ``get_bleu(c_i, c_j)``;
  **div-4** per source: unique/total 4-grams pooled over its candidates; both then averaged
  over sources.
* **MBR** (``selectBest``): candidate i scores ``sum_{j != i} get_bleu(c_i, c_j)`` on the
  stripped candidates; ``np.argmax`` takes the first maximum.
* All averages are ``numpy.mean`` of per-item Python floats, as in DiffuSeq (numpy's pairwise
  summation, so the last bits agree too).

The sentence BLEU here is computed from cached n-gram counts with nltk's own floating-point
operations (nltk 3.10 ``corpus_bleu`` + ``SmoothingFunction().method4``); the tests check it
against nltk bit for bit. BERTScore is DiffuSeq's call of the ``bert-score`` package (no idf, no
rescaling); offline it runs on a local model (MiniLM by default, not DiffuSeq's deberta-xlarge-mnli
at layer 40), and the result names the model, the layer and the package version.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np

from common.errors import UserError

KEYS = ("recover", "reference", "source")
CLS, SEP, PAD = "[CLS]", "[SEP]", "[PAD]"
MAX_ORDER = 4
SMOOTH_K = 5  # SmoothingFunction(k=5), nltk's default, used by method4

CONVENTIONS = (
    "DiffuSeq eval_seq2seq.py conventions (current script, commit e44113d and later): text.strip() then "
    "[SEP]/[CLS] (and [PAD] in recover) removed by str.replace, no further whitespace normalisation; "
    "bleu = mean of nltk sentence_bleu([reference.split()], recover.split(), SmoothingFunction().method4) "
    "(get_bleu(recover, reference)); bleu_reversed = the reversed argument order of DiffuSeq's first "
    "release and DiffusionBERT, sentence_bleu([recover.split()], reference.split()); rouge_l = "
    "torchmetrics rougeL_fmeasure per sentence, averaged; dist_1 = per sentence unique/total unigrams "
    "(0 if empty), averaged; avg_len = len(recover.split(' ')), avg_len_words = len(recover.split()); "
    "self_bleu = per source mean over candidate pairs i<j of get_bleu(c_i, c_j) = "
    "sentence_bleu([c_j], c_i), then mean over sources (self_bleu_reversed: sentence_bleu([c_i], c_j)); "
    "div_4 = per source distinct/total 4-grams pooled over its candidates, then mean over sources; "
    "MBR = argmax_i sum_{j!=i} get_bleu(c_i, c_j) on the stripped candidates (ties: lowest index); "
    "all means with numpy.mean; bertscore_f1 = the bert-score package as DiffuSeq calls it "
    "(score(recover, reference, model_type, lang='en'): no idf, no baseline rescaling, [CLS]/[SEP] weight 0 "
    "in the averages but kept as match candidates, padded positions cosine 0 in the maxima, batches of "
    "bertscore_batch_size pairs), on bertscore_model at bertscore_layer, torch.mean of the float32 F1; "
    "exact_match = fraction of sources whose recover.split() equals reference.split(); "
    "token_accuracy = per source, positions j with recover.split()[j] == reference.split()[j] over the "
    "longer of the two lengths (1 if both are empty), then the mean (ours, for tasks with one right output)."
)


# --------------------------------------------------------------------------- input


def strip_special(text: str, pad: bool = True) -> str:
    """Remove special tokens the way DiffuSeq does: ``strip()`` first, then delete the tokens.

    ``pad=True`` is DiffuSeq's treatment of ``recover``; its ``reference`` keeps ``[PAD]``
    (``pad=False``). The spaces around removed tokens stay (``"[CLS] a [SEP]" -> " a "``).
    """
    # DiffuSeq removes its eos, sos and sep tokens in that order; with BERT's vocabulary eos and sep
    # are both [SEP], so one replace does it
    text = text.strip().replace(SEP, "").replace(CLS, "")
    return text.replace(PAD, "") if pad else text


def decode_like_diffuseq(tokenizer, ids) -> str:
    """The string DiffuSeq writes for the token ids ``[L]`` of one canvas region.

    As DiffuSeq's ``decode_token`` (``basic_utils.py``): only the trailing [PAD] ids are dropped, the
    rest is ``tokenizer.decode``-d with the special tokens kept (``[CLS] ... [SEP]``, and a [PAD]
    generated before other tokens) and BERT's clean-up of tokenization spaces (``i ' m`` -> ``i'm``,
    ``moon ?`` -> ``moon?``), which was the default under DiffuSeq's transformers 4.22;
    transformers 5 turned it off by default, so it is asked for here.

    Args:
        tokenizer: a transformers tokenizer with a ``pad_token_id``.
        ids: ``[L]`` ints (a list or a 1-d tensor).
    """
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    end = len(ids)
    while end and ids[end - 1] == tokenizer.pad_token_id:
        end -= 1
    return tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=True)


def read_outputs(path: str) -> list[dict]:
    """Rows ``{"recover", "reference", "source"}`` of a DiffuSeq output file (JSON lines).

    Every line must be a JSON object holding those three keys with string values; a bad line
    raises ``UserError("PATH:LINE: ...")``. Other keys are ignored.
    """
    if not os.path.isfile(path):
        raise UserError(f"samples file {path} " + ("is not a regular file" if os.path.exists(path)
                                                     else "does not exist"))
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                if not line.strip():
                    raise UserError(f"{where}: empty line (expected one JSON object per line)")
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not valid JSON ({e.msg})")
                if not isinstance(obj, dict):
                    raise UserError(f"{where}: expected a JSON object with keys {', '.join(KEYS)}")
                missing = [k for k in KEYS if k not in obj]
                if missing:
                    raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
                for k in KEYS:
                    if not isinstance(obj[k], str):
                        raise UserError(f"{where}: '{k}' must be a string, got {type(obj[k]).__name__}")
                rows.append({k: obj[k] for k in KEYS})
    except UnicodeDecodeError as e:
        raise UserError(f"samples file {path} is not valid UTF-8 ({e.reason})")
    except OSError as e:
        raise UserError(f"cannot read samples file {path}: {e.strerror or e}")
    if not rows:
        raise UserError(f"samples file {path} has no rows")
    return rows


def _words(source: str) -> list[str]:
    return strip_special(source, pad=False).split()


def check_same_sources(rows_per_seed: Sequence[list[dict]], names: Sequence[str] | None = None) -> None:
    """Raise ``UserError`` unless every file has the first file's sources, row by row.

    Sources are compared without [CLS]/[SEP] and up to whitespace.
    """
    names = list(names) if names is not None else [f"file {i}" for i in range(len(rows_per_seed))]
    first = rows_per_seed[0]
    for name, rows in zip(names[1:], rows_per_seed[1:]):
        if len(rows) != len(first):
            raise UserError(f"{name} has {len(rows)} rows but {names[0]} has {len(first)}; "
                            "the files must hold the same sources in the same order")
        for k, (a, b) in enumerate(zip(first, rows)):
            if _words(a["source"]) != _words(b["source"]):
                raise UserError(f"{name}:{k + 1}: source differs from {names[0]}:{k + 1}; "
                                "the files must hold the same sources in the same order")


# --------------------------------------------------------------------------- sentence BLEU


@dataclass(frozen=True)
class _Stats:
    """Whitespace tokens of one sentence, reduced to what BLEU needs: length and n-gram counts."""
    length: int
    counts: tuple  # counts[n - 1]: Counter of n-gram tuples


@lru_cache(maxsize=65536)
def _stats(text: str) -> _Stats:
    tokens = text.split()
    return _Stats(len(tokens), tuple(Counter(zip(*(tokens[i:] for i in range(n))))
                                     for n in range(1, MAX_ORDER + 1)))


def _bleu_m4(hyp: _Stats, ref: _Stats) -> float:
    """nltk ``sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method4)``.

    The same floating-point operations as nltk: modified precisions num/den with
    den = max(1, #hyp n-grams); 0.0 if no unigram matches; method4 replaces the i-th zero
    precision (counting only zeros, ``incvnt`` = 1, 2, ...) by
    ``1 / (2**incvnt * k / ln(hyp_len)) / den`` when ``hyp_len > 1``, other zeros are dropped;
    brevity penalty ``exp(1 - r/c)`` for ``c <= r``; score ``bp * exp(fsum(0.25 * ln p_n))``.
    """
    numerators = []
    for h, r in zip(hyp.counts, ref.counts):
        numerators.append(sum(min(c, r[g]) for g, c in h.items() if g in r))
    if numerators[0] == 0:
        return 0.0
    c, r_len = hyp.length, ref.length
    bp = 1.0 if c > r_len else math.exp(1 - r_len / c)
    log_terms = []
    incvnt = 1
    for n, num in enumerate(numerators, start=1):
        den = max(1, c - n + 1)
        if num == 0:
            if c > 1:
                p = 1 / (2 ** incvnt * SMOOTH_K / math.log(c)) / den
                incvnt += 1
            else:
                continue  # p = 0 is left out of the sum, as in nltk
        else:
            p = num / den  # int / int is correctly rounded, as float(Fraction(num, den))
        log_terms.append(0.25 * math.log(p))
    return bp * math.exp(math.fsum(log_terms))


def sentence_bleu_m4(hyp: str, ref: str) -> float:
    """``sentence_bleu([ref.split()], hyp.split(), smoothing_function=method4)``."""
    return _bleu_m4(_stats(hyp), _stats(ref))


ORDERS = ("diffuseq", "reversed")


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown BLEU order {order!r}; choose from {', '.join(ORDERS)}")


def get_bleu(recover: str, reference: str, order: str = "diffuseq") -> float:
    """DiffuSeq's ``get_bleu(recover, reference)``.

    ``order="diffuseq"`` (its current script): ``sentence_bleu([reference.split()], recover.split())``,
    the generated text as hypothesis. ``order="reversed"`` (its first release, DiffusionBERT's
    ``compute_metric.py``): ``sentence_bleu([recover.split()], reference.split())``.
    """
    _check_order(order)
    if order == "reversed":
        recover, reference = reference, recover
    return _bleu_m4(_stats(recover), _stats(reference))


def bleu(hyps: Sequence[str], refs: Sequence[str], order: str = "diffuseq") -> float:
    """Mean sentence BLEU, ``np.mean(get_bleu(h, r, order))``."""
    _check_pairs(hyps, refs)
    return float(np.mean([get_bleu(h, r, order) for h, r in zip(hyps, refs)]))


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("need at least one sentence pair")


# --------------------------------------------------------------------------- ROUGE-L, dist-1, length


def rouge_l_per_sentence(hyps: Sequence[str], refs: Sequence[str]) -> list[float]:
    """torchmetrics rougeL F-measure of each ``(hyp, ref)`` pair (float32 values, as DiffuSeq's
    ``ROUGEScore()(recover, reference)['rougeL_fmeasure'].tolist()``).

    The functional form gives the same value as the ``ROUGEScore(rouge_keys="rougeL")`` module
    called on one pair, about 15x faster. Only rougeL: rougeLsum needs nltk's punkt data.
    """
    from torchmetrics.functional.text.rouge import rouge_score

    _check_pairs(hyps, refs)
    return [rouge_score(h, r, rouge_keys="rougeL")["rougeL_fmeasure"].tolist()
            for h, r in zip(hyps, refs)]


def rouge_l(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean per-sentence ROUGE-L F-measure."""
    return float(np.mean(rouge_l_per_sentence(hyps, refs)))


def _distinct_ratio(grams: list) -> float:
    return len(set(grams)) / len(grams) if grams else 0.0


def _ngrams(text: str, n: int) -> list[tuple]:
    tokens = text.split()
    return list(zip(*(tokens[i:] for i in range(n))))


def dist_1(hyps: Sequence[str]) -> float:
    """Per-sentence unique/total whitespace unigrams, averaged; an empty sentence counts as 0."""
    if not hyps:
        raise ValueError("dist-1 needs at least one sentence")
    return float(np.mean([_distinct_ratio(_ngrams(h, 1)) for h in hyps]))


def avg_len(hyps: Sequence[str]) -> float:
    """DiffuSeq's length: ``len(h.split(' '))`` (empty pieces between spaces count), averaged."""
    if not hyps:
        raise ValueError("avg len needs at least one sentence")
    return float(np.mean([len(h.split(" ")) for h in hyps]))


def avg_len_words(hyps: Sequence[str]) -> float:
    """Mean number of whitespace tokens (``str.split()``)."""
    if not hyps:
        raise ValueError("avg len needs at least one sentence")
    return float(np.mean([len(h.split()) for h in hyps]))


def exact_match(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of pairs whose whitespace tokens are identical (:data:`CONVENTIONS`)."""
    _check_pairs(hyps, refs)
    return float(np.mean([h.split() == r.split() for h, r in zip(hyps, refs)]))


def token_accuracy(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean over pairs of the position-wise token matches over the longer length (:data:`CONVENTIONS`)."""
    _check_pairs(hyps, refs)
    acc = []
    for h, r in zip(hyps, refs):
        h, r = h.split(), r.split()
        n = max(len(h), len(r))
        acc.append(1.0 if n == 0 else sum(a == b for a, b in zip(h, r)) / n)
    return float(np.mean(acc))


# --------------------------------------------------------------------------- across candidates


def _check_candidates(candidate_lists: Sequence[Sequence[str]]) -> None:
    if not candidate_lists:
        raise ValueError("need at least one source")
    if any(len(c) == 0 for c in candidate_lists):
        raise ValueError("every source needs at least one candidate")


def _bleu_matrix(cands: Sequence[str], order: str) -> list[list[float]]:
    """``m[i][j] = get_bleu(c_i, c_j, order)`` for i != j, 0 on the diagonal."""
    _check_order(order)
    stats = [_stats(c) for c in cands]
    n = len(stats)
    m = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                m[i][j] = _bleu_m4(stats[i], stats[j]) if order == "diffuseq" else _bleu_m4(stats[j], stats[i])
    return m


def self_bleu(candidate_lists: Sequence[Sequence[str]], order: str = "diffuseq") -> float:
    """DiffuSeq self-BLEU: per source ``np.mean`` over pairs i < j of ``get_bleu(c_i, c_j)`` =
    ``sentence_bleu([c_j], c_i)`` (0 for a single candidate), then ``np.mean`` over sources.

    Args:
        candidate_lists: ``[num_sources][num_candidates]`` strings.
    """
    _check_candidates(candidate_lists)
    per_source = []
    for cands in candidate_lists:
        m = _bleu_matrix(cands, order)
        pairs = [m[i][j] for i in range(len(cands)) for j in range(i + 1, len(cands))]
        per_source.append(np.mean(pairs) if pairs else 0.0)
    return float(np.mean(per_source))


def div_4(candidate_lists: Sequence[Sequence[str]]) -> float:
    """DiffuSeq div-4: per source distinct/total 4-grams pooled over its candidates (n-grams do not
    span candidates; 0 if there is none), then ``np.mean`` over sources."""
    _check_candidates(candidate_lists)
    per_source = []
    for cands in candidate_lists:
        pooled = []
        for c in cands:
            pooled.extend(_ngrams(c, 4))
        per_source.append(_distinct_ratio(pooled))
    return float(np.mean(per_source))


def mbr_select(candidates: Sequence[Sequence[str]], order: str = "diffuseq") -> list[int]:
    """Minimum-Bayes-risk choice per source, as DiffuSeq's ``selectBest``.

    Candidate i scores ``sum_{j != i} get_bleu(c_i, c_j)`` = ``sum_{j != i} sentence_bleu([c_j], c_i)``:
    c_i is the hypothesis, each other candidate a reference (``order="reversed"`` swaps the roles).
    The highest score wins, ties go to the lowest index (``np.argmax``). The row sum is ``np.sum``
    over the full row with a 0 on the diagonal, as DiffuSeq does, so near-ties break the same way.
    DiffuSeq chooses among candidates stripped of special tokens (:func:`strip_special`).

    Args:
        candidates: ``[num_sources][num_candidates]`` strings.

    Returns:
        ``[num_sources]`` indices into each source's candidate list.
    """
    _check_candidates(candidates)
    return [int(np.argmax(np.sum(_bleu_matrix(cands, order), -1))) for cands in candidates]


# --------------------------------------------------------------------------- BERTScore


@dataclass
class BertScore:
    """Mean BERTScore and its per-sentence values; ``name`` says which model and layer."""
    f1: float
    precision: float
    recall: float
    model: str
    layer: int
    num_layers: int
    package: str  # "bert-score VERSION", the package that computed it
    f1_per_sentence: list[float] = field(repr=False)
    precision_per_sentence: list[float] = field(repr=False)
    recall_per_sentence: list[float] = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.model} layer {self.layer}/{self.num_layers}"


def bertscore_package() -> str:
    """``"bert-score VERSION"`` from the installed distribution (the 0.3.13 wheel's
    ``bert_score.__version__`` still says 0.3.12)."""
    from importlib import metadata
    return f"bert-score {metadata.version('bert-score')}"


@dataclass(frozen=True)
class _Encoder:
    tokenizer: object
    network: object  # bert-score's get_model: the first ``layer`` blocks only
    layer: int
    num_layers: int


def _needs_prefix_space(tokenizer) -> bool:
    """Whether bert-score (under transformers 4, as DiffuSeq ran it) encoded with a leading space.

    Its ``sent_encode`` passes ``add_prefix_space=True`` for GPT2Tokenizer/RobertaTokenizer instances,
    DeBERTa's included (``DebertaTokenizer(GPT2Tokenizer)`` in transformers 4). In transformers 5 the
    DeBERTa class no longer subclasses GPT-2's and ``encode`` ignores the argument, so the first word
    would be split as a sentence-initial word, unlike in DiffuSeq's numbers.
    """
    import transformers
    names = ("GPT2Tokenizer", "RobertaTokenizer", "DebertaTokenizer")
    return isinstance(tokenizer, tuple(getattr(transformers, n) for n in names if hasattr(transformers, n)))


@lru_cache(maxsize=2)
def _encoder(model: str, layer: int | None, device: str) -> _Encoder:
    """The tokenizer and truncated network bert-score would build, loaded once per (model, layer, device).

    The layer defaults to bert-score's own choice where it has one (``model2layers``: 40 for
    ``microsoft/deberta-xlarge-mnli``, what DiffuSeq's call gets), else to the last layer. bert-score
    keeps the first ``layer`` blocks and takes their output, i.e. ``hidden_states[layer]``.
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from common.loading import resolve_model_path

    path = resolve_model_path(model)

    def fail(e: Exception) -> UserError:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return UserError(f"cannot load the BERTScore model {model}: {first} "
                         "(--bertscore_model takes minilm, a model directory, a cached hub name, or none)")

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise fail(e) from e
    from bert_score.utils import get_model, get_tokenizer, model2layers  # only here: never with --bertscore_model none

    num_layers = config.num_hidden_layers
    layer = model2layers.get(path, num_layers) if layer is None else layer
    if not 0 <= layer <= num_layers:
        raise UserError(f"BERTScore layer must be in 0..{num_layers} for {model}, got {layer}")
    # bert-score picks the network by its name: T5's encoder for any name containing "t5", a download for "scibert*"
    if ("t5" in path and "t5" not in config.model_type) or path.startswith("scibert"):
        raise UserError(f"bert-score would misread the model name {path} (it contains 't5' or starts with "
                        "'scibert'); move or link the model to another directory")
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a metric run prints its table, not a loading bar
    try:
        tokenizer = get_tokenizer(path, use_fast=False)  # bert-score's default use_fast_tokenizer=False
        if _needs_prefix_space(tokenizer):
            tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False, add_prefix_space=True)
        if not hasattr(tokenizer, "build_inputs_with_special_tokens"):
            # bert-score encodes an empty sentence as build_inputs_with_special_tokens([]) ([CLS] [SEP]);
            # transformers 5 dropped the method, and the package would fail on an empty output
            empty = tokenizer("")["input_ids"]

            def build_inputs_with_special_tokens(ids):
                if ids:
                    raise NotImplementedError("only the empty sentence's encoding is provided")
                return list(empty)
            tokenizer.build_inputs_with_special_tokens = build_inputs_with_special_tokens
        network = get_model(path, layer).to(device)
    except (OSError, ValueError) as e:
        raise fail(e) from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return _Encoder(tokenizer, network, layer, num_layers)


def bert_score(hyps: Sequence[str], refs: Sequence[str], model: str = "minilm", batch_size: int = 64,
               device: str = "cpu", layer: int | None = None) -> BertScore:
    """BERTScore of each ``(hyp, ref)`` pair, computed by the ``bert-score`` package as DiffuSeq does.

    DiffuSeq calls ``bert_score.score(recovers, references, model_type=..., lang="en")``: Zhang et al.
    (2020), Eq. 1-3, without idf or baseline rescaling. That call is ``bert_cos_score_idf`` with the
    weights below, run here on the package's own tokenizer and truncated network (:func:`_encoder`).
    As in the package:

    * [CLS] and [SEP] have weight 0 in the averages but stay in the similarity matrix, so a word may
      take its best match on the other side's [CLS]/[SEP];
    * padding counts as similarity 0 in the maxima, so a token whose best cosine is negative scores 0
      when the other sentence is shorter than the longest in its batch of ``batch_size`` pairs (64,
      bert-score's default, gives DiffuSeq's batches);
    * a pair with an empty side scores P = R = F = 0.

    Args:
        hyps, refs: ``[N]`` strings (``recover`` and ``reference`` of DiffuSeq's call).
        model: ``minilm``, a model directory, or a hub name (e.g. ``microsoft/deberta-xlarge-mnli``)
            that is cached or can be downloaded.
        layer: the hidden state to use (0 = input embeddings); default bert-score's layer for the
            model, else the last.

    The means are ``torch.mean`` of the float32 scores, as DiffuSeq prints them.
    """
    from bert_score.utils import bert_cos_score_idf

    _check_pairs(hyps, refs)
    enc = _encoder(model, layer, device)
    tok = enc.tokenizer
    weight = defaultdict(lambda: 1.0, {tok.sep_token_id: 0.0, tok.cls_token_id: 0.0})  # score(idf=False)
    prf = bert_cos_score_idf(enc.network, list(refs), list(hyps), tok, weight, batch_size=batch_size,
                             device=device).cpu()
    P, R, F = prf.unbind(-1)
    return BertScore(f1=F.mean().item(), precision=P.mean().item(), recall=R.mean().item(),
                     model=model, layer=enc.layer, num_layers=enc.num_layers, package=bertscore_package(),
                     f1_per_sentence=F.tolist(), precision_per_sentence=P.tolist(), recall_per_sentence=R.tolist())


# --------------------------------------------------------------------------- one call for a run


def pair_metrics(recovers: Sequence[str], references: Sequence[str], bertscore_model: str | None = "minilm",
                 bertscore_layer: int | None = None, device: str = "cpu", batch_size: int = 64) -> dict:
    """BLEU, ROUGE-L, exact match, token accuracy, BERTScore F1, dist-1 and lengths of stripped ``recover``/``reference`` lists."""
    out = {
        "bleu": bleu(recovers, references),
        "bleu_reversed": bleu(recovers, references, order="reversed"),
        "rouge_l": rouge_l(recovers, references),
        "exact_match": exact_match(recovers, references),
        "token_accuracy": token_accuracy(recovers, references),
    }
    if bertscore_model is not None:
        bs = bert_score(recovers, references, model=bertscore_model, layer=bertscore_layer,
                        device=device, batch_size=batch_size)
        out["bertscore_f1"] = bs.f1
        out["bertscore_model"] = bs.name
        out["bertscore_layer"] = bs.layer
        out["bertscore_package"] = bs.package
    out["dist_1"] = dist_1(recovers)
    out["avg_len"] = avg_len(recovers)
    out["avg_len_words"] = avg_len_words(recovers)
    return out


def evaluate_outputs(rows_per_seed: Sequence[list[dict]], bertscore_model: str | None = "minilm",
                     mbr: bool = False, names: Sequence[str] | None = None,
                     bertscore_layer: int | None = None, device: str = "cpu", batch_size: int = 64,
                     mbr_order: str = "diffuseq") -> dict:
    """All seq2seq metrics for one or several (per-seed) output files.

    Args:
        rows_per_seed: ``[num_files][num_sources]`` rows from :func:`read_outputs`; every file must
            hold the same sources in the same order.
        bertscore_model: ``minilm``, a model directory, a hub name, or None to skip BERTScore (:func:`bert_score`).
        mbr: with >= 2 files, report the headline metrics on the MBR choice among the files'
            candidates (DiffuSeq ``--mbr``) instead of on the first file.
        names: file names for error messages.
        mbr_order: the BLEU argument order of the MBR choice (:data:`ORDERS`).

    Returns:
        A flat dict: the headline metrics (``metrics_on`` says on what), and with >= 2 files
        ``self_bleu``, ``self_bleu_reversed``, ``div_4``, ``per_file`` (a list of per-file metric
        dicts) and, with ``mbr``, ``mbr_choice`` (the chosen file's index per source). The reference
        of a source is the first file's (as DiffuSeq).
    """
    if not rows_per_seed:
        raise ValueError("need at least one file")
    check_same_sources(rows_per_seed, names)
    recovers = [[strip_special(r["recover"]) for r in rows] for rows in rows_per_seed]
    references = [strip_special(r["reference"], pad=False) for r in rows_per_seed[0]]
    kw = dict(bertscore_model=bertscore_model, bertscore_layer=bertscore_layer, device=device,
              batch_size=batch_size)
    num_files, num_sources = len(rows_per_seed), len(references)

    if num_files == 1:
        return {"metrics_on": "the file", **pair_metrics(recovers[0], references, **kw),
                "num_sources": num_sources, "num_files": 1}

    per_source = [list(c) for c in zip(*recovers)]  # [num_sources][num_files]
    per_file = [pair_metrics(rec, references, **kw) for rec in recovers]
    extra = {}
    if mbr:
        picks = mbr_select(per_source, order=mbr_order)
        headline = pair_metrics([c[i] for c, i in zip(per_source, picks)], references, **kw)
        metrics_on = f"MBR choice among {num_files} candidates per source"
        if mbr_order != "diffuseq":
            metrics_on += f" ({mbr_order} BLEU order)"
        extra["mbr_choice"] = picks
    else:
        headline = per_file[0]
        metrics_on = "the first file"
    return {"metrics_on": metrics_on, **headline,
            "self_bleu": self_bleu(per_source), "self_bleu_reversed": self_bleu(per_source, order="reversed"),
            "div_4": div_4(per_source), "num_sources": num_sources, "num_files": num_files,
            "per_file": per_file, **extra}
