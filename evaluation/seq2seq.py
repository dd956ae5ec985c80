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
against nltk bit for bit. BERTScore is not DiffuSeq's (deberta-xlarge-mnli, layer 40): it runs
on a local model and the result names the model and layer.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
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
    "all means with numpy.mean; bertscore_f1 = greedy cosine matching of one layer's token embeddings "
    "of a local model, no idf, no baseline rescaling, [CLS]/[SEP]/[PAD] excluded from matching and "
    "averaging; exact_match = fraction of sources whose recover.split() equals reference.split(); "
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


def greedy_cosine_prf(hyp_emb, hyp_mask, ref_emb, ref_mask):
    """BERTScore P, R, F1 from token embeddings (Zhang et al. 2020, Eq. 1-3, no idf).

    Each hyp token is matched to its most similar ref token (precision) and each ref token to
    its most similar hyp token (recall), by cosine similarity; masked tokens take no part.

    Args:
        hyp_emb: ``[B, Lh, D]``; hyp_mask: ``[B, Lh]`` bool, True = a token that counts.
        ref_emb: ``[B, Lr, D]``; ref_mask: ``[B, Lr]`` bool.

    Returns:
        ``(P, R, F)``, each ``[B]`` float64; 0 for a pair where either side has no token.
    """
    import torch
    import torch.nn.functional as F

    h = F.normalize(hyp_emb.double(), dim=-1)
    r = F.normalize(ref_emb.double(), dim=-1)
    sim = torch.bmm(h, r.transpose(1, 2))  # [B, Lh, Lr]
    pair_mask = hyp_mask[:, :, None] & ref_mask[:, None, :]
    sim = sim.masked_fill(~pair_mask, float("-inf"))
    n_h = hyp_mask.sum(1)
    n_r = ref_mask.sum(1)
    ok = (n_h > 0) & (n_r > 0)
    best_for_hyp = sim.max(dim=2).values.masked_fill(~hyp_mask, 0.0)  # [B, Lh]
    best_for_ref = sim.max(dim=1).values.masked_fill(~ref_mask, 0.0)  # [B, Lr]
    zero = torch.zeros_like(n_h, dtype=torch.float64)
    P = torch.where(ok, best_for_hyp.sum(1) / n_h.clamp(min=1), zero)
    R = torch.where(ok, best_for_ref.sum(1) / n_r.clamp(min=1), zero)
    denom = P + R
    Fs = torch.where(ok & (denom != 0), 2 * P * R / torch.where(denom != 0, denom, 1.0), zero)
    return P, R, Fs


@dataclass
class BertScore:
    """Mean BERTScore and its per-sentence values; ``name`` says which model and layer."""
    f1: float
    precision: float
    recall: float
    model: str
    layer: int
    num_layers: int
    f1_per_sentence: list[float] = field(repr=False)
    precision_per_sentence: list[float] = field(repr=False)
    recall_per_sentence: list[float] = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.model} layer {self.layer}/{self.num_layers}"


@lru_cache(maxsize=2)
def _load_encoder(model: str, device: str):
    from common.loading import load_encoder
    tok, net = load_encoder(model)
    return tok, net.to(device)


def bert_score(hyps: Sequence[str], refs: Sequence[str], model: str = "minilm", batch_size: int = 64,
               device: str = "cpu", layer: int | None = None) -> BertScore:
    """BERTScore of each ``(hyp, ref)`` pair with a local encoder.

    Args:
        model: ``minilm`` (resolved by ``common.loading.resolve_model_path``) or a model directory.
        layer: hidden state to use, 1..num_layers (0 = input embeddings); default the last.

    Special tokens ([CLS], [SEP], padding) are dropped before matching. Pairs are batched by
    length; embeddings stay float32, the similarity and averages are float64.
    """
    import torch

    _check_pairs(hyps, refs)
    tok, net = _load_encoder(model, device)
    num_layers = net.config.num_hidden_layers
    layer = num_layers if layer is None else layer
    if not 0 <= layer <= num_layers:
        raise UserError(f"BERTScore layer must be in 0..{num_layers} for {model}, got {layer}")
    max_len = min(tok.model_max_length, getattr(net.config, "max_position_embeddings", 512))

    def embed(texts):
        enc = tok(list(texts), padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt", return_special_tokens_mask=True)
        keep = enc.pop("special_tokens_mask").eq(0) & enc["attention_mask"].bool()
        enc = {k: v.to(device) for k, v in enc.items()}
        out = net(**enc, output_hidden_states=True)
        return out.hidden_states[layer].float().cpu(), keep

    n = len(hyps)
    P = [0.0] * n
    R = [0.0] * n
    F = [0.0] * n
    order = sorted(range(n), key=lambda i: len(hyps[i]) + len(refs[i]))  # less padding per batch
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            h_emb, h_keep = embed(hyps[i] for i in idx)
            r_emb, r_keep = embed(refs[i] for i in idx)
            p, r, f = greedy_cosine_prf(h_emb, h_keep, r_emb, r_keep)
            for k, i in enumerate(idx):
                P[i], R[i], F[i] = p[k].item(), r[k].item(), f[k].item()
    return BertScore(f1=float(np.mean(F)), precision=float(np.mean(P)), recall=float(np.mean(R)),
                     model=model, layer=layer, num_layers=num_layers,
                     f1_per_sentence=F, precision_per_sentence=P, recall_per_sentence=R)


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
        bertscore_model: ``minilm``, a model directory, or None to skip BERTScore.
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
