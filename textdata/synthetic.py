"""Synthetic tasks with a known answer: a language with an exact entropy, and a seq2seq task with one
right output (docs/algorithms.md §5).

* :class:`SyntheticLanguage`: a sparse first-order Markov chain over ``V`` made-up words with a
  Zipf-like frequency spectrum and an explicit length distribution. A sequence is
  ``n ~ p(n)``, ``w_1 ~ pi``, ``w_{i+1} ~ P(. | w_i)``, so

  ``log p(w_1..w_n) = log p(n) + log pi(w_1) + sum_i log P(w_{i+1} | w_i)``

  and the entropy per sequence is exact:
  ``H = H(n) + sum_n p(n) [H(pi) + sum_{i=1}^{n-1} sum_s m_i(s) h(s)]`` with ``m_i = pi P^{i-1}`` the
  marginal of ``w_i`` and ``h(s)`` the entropy of row ``s``. Each word allows only ``branching``
  successors, so a sample with a forbidden transition is detectable.
* :func:`reverse_map_pairs`: source = a sequence of the language, target = the source reversed with
  every word mapped through a fixed bijection of the vocabulary. Exact match is measurable.
* :func:`write_tokenizer`: a word-level BERT tokenizer (``tokenizer.json``, built by ``tokenizers``) and a
  small ``BertConfig`` in one directory, so ``train.py --model_name_or_path DIR --from_scratch``
  (and ``AutoTokenizer.from_pretrained(DIR)``) load them; every word is one token.

Everything is generated from a seed with numpy; nothing is downloaded. Entropies are in nats.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from common.io import write_json_atomic, write_text_atomic
from common.stats import ratio_standard_error

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FORMAT = "synthetic-markov-v1"
_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()


def made_up_words(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` distinct lowercase consonant-vowel words of 2 or 3 syllables, in a seeded order."""
    syllables = [c + v for c in _ONSETS for v in _VOWELS]
    two = [a + b for a in syllables for b in syllables]
    if count > len(two):
        raise ValueError(f"at most {len(two)} words, asked for {count}")
    return [two[i] for i in rng.choice(len(two), size=count, replace=False)]


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) along the last axis; 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


@dataclass
class SyntheticLanguage:
    """A length distribution ``p(n)`` on ``min_len..max_len``, a start distribution ``pi`` [V] and a
    sparse transition matrix ``trans`` [V, V] (rows sum to 1), over ``words``."""

    words: list[str]
    start: np.ndarray
    trans: np.ndarray
    length_probs: np.ndarray  # [max_len + 1]; zero below min_len
    seed: int = 0

    # ---- construction
    @classmethod
    def generate(cls, seed: int = 0, vocab_size: int = 300, branching: int = 8, zipf: float = 1.0,
                 successor_bias: float = 0.3, min_len: int = 6, max_len: int = 20,
                 concentration: float = 1.0) -> "SyntheticLanguage":
        """A random language. Word ``j`` (by rank) has weight ``z_j = (j + 1) ** -zipf``; each word draws
        ``branching`` distinct successors with probability proportional to ``z_j ** successor_bias``,
        and their transition probabilities are ``z_j`` times a Gamma(``concentration``) draw,
        normalised. ``pi`` is ``z`` normalised; ``p(n)`` is a discretised bell on ``min_len..max_len``.
        The defaults give a Zipf-like spectrum (word frequency against rank has slope about -1, the
        commonest word about 8%) and 1.69 nats per token against 4.44 for the unigram distribution."""
        if not (1 <= min_len <= max_len):
            raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        if not (1 <= branching <= vocab_size):
            raise ValueError(f"need 1 <= branching <= vocab_size, got {branching}, {vocab_size}")
        rng = np.random.default_rng(seed)
        words = made_up_words(vocab_size, rng)
        weight = (np.arange(vocab_size) + 1.0) ** -zipf
        pick = weight ** successor_bias
        trans = np.zeros((vocab_size, vocab_size))
        for i in range(vocab_size):
            succ = rng.choice(vocab_size, size=branching, replace=False, p=pick / pick.sum())
            trans[i, succ] = weight[succ] * rng.gamma(concentration, size=branching)
        trans /= trans.sum(1, keepdims=True)
        n = np.arange(max_len + 1)
        mid, width = (min_len + max_len) / 2, max(1.0, (max_len - min_len) / 4)
        length_probs = np.where(n >= min_len, np.exp(-0.5 * ((n - mid) / width) ** 2), 0.0)
        return cls(words, weight / weight.sum(), trans, length_probs / length_probs.sum(), seed)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @cached_property
    def index(self) -> dict[str, int]:
        """word -> its id (row of ``trans``)."""
        return {w: i for i, w in enumerate(self.words)}

    # ---- exact quantities
    def marginals(self) -> np.ndarray:
        """``m`` [max_len, V]: ``m[i]`` is the distribution of word ``i + 1`` (``pi P^i``)."""
        m = np.zeros((len(self.length_probs) - 1, self.vocab_size))
        m[0] = self.start
        for i in range(1, len(m)):
            m[i] = m[i - 1] @ self.trans
        return m

    def entropy(self) -> dict:
        """Exact entropies (nats): ``per_sequence`` (= ``length`` + ``words_given_length``),
        ``mean_length`` and ``per_token`` = per_sequence / mean_length (every word is one token)."""
        h_row = _entropy(self.trans)
        step = self.marginals() @ h_row  # [max_len]: expected entropy of w_{i+1} given w_i
        # H(w_1..w_n | n) = H(pi) + sum_{i<n} step[i-1]
        cum = np.concatenate([[0.0], np.cumsum(step)])
        n = np.arange(len(self.length_probs))
        given_n = np.where(n >= 1, _entropy(self.start) + cum[np.maximum(n - 1, 0)], 0.0)
        h_len = float(_entropy(self.length_probs))
        h_words = float((self.length_probs * given_n).sum())
        mean_len = float((self.length_probs * n).sum())
        return {"per_sequence": h_len + h_words, "length": h_len, "words_given_length": h_words,
                "mean_length": mean_len, "per_token": (h_len + h_words) / mean_len,
                "per_token_given_length": h_words / mean_len}

    def log_prob(self, words: list[str]) -> float:
        """Exact ``log p(words)`` (length term included); ``-inf`` for an unknown word, a length
        outside ``min_len..max_len`` or a forbidden transition."""
        n = len(words)
        if n >= len(self.length_probs) or self.length_probs[n] == 0 or any(w not in self.index for w in words):
            return -math.inf
        ids = [self.index[w] for w in words]
        p = [self.length_probs[n], self.start[ids[0]]] + [self.trans[a, b] for a, b in zip(ids, ids[1:])]
        return -math.inf if min(p) == 0 else float(np.log(p).sum())

    def forbidden_transitions(self, words: list[str]) -> int:
        """How many adjacent pairs the language never produces (an unknown word counts as one)."""
        bad = sum(w not in self.index for w in words)
        ids = [self.index.get(w) for w in words]
        return bad + sum(1 for a, b in zip(ids, ids[1:]) if a is not None and b is not None and self.trans[a, b] == 0)

    # ---- sampling
    def sample(self, count: int, seed: int) -> list[list[str]]:
        """``count`` sequences, deterministic in ``seed`` (and independent of the generation seed)."""
        rng = np.random.default_rng(seed)
        cum = np.cumsum(self.trans, 1)
        lengths = rng.choice(len(self.length_probs), size=count, p=self.length_probs)
        out = []
        for n in lengths:
            ids = [int(rng.choice(self.vocab_size, p=self.start))]
            for u in rng.random(int(n) - 1):
                ids.append(int(min(np.searchsorted(cum[ids[-1]], u, side="right"), self.vocab_size - 1)))
            out.append([self.words[i] for i in ids])
        return out

    def unigram(self) -> np.ndarray:
        """Expected word frequencies [V] over a sequence (length-weighted marginals)."""
        m = self.marginals()
        n = np.arange(len(self.length_probs))
        counts = np.array([(self.length_probs * (n > i)).sum() for i in range(len(m))])
        f = (counts[:, None] * m).sum(0)
        return f / f.sum()

    def expected_bigrams(self) -> np.ndarray:
        """``F`` [V + 1, V + 1]: the expected frequency of each transition of a sequence, the boundary as
        index ``V`` (``F[V, a]``: the start ``a``; ``F[a, V]``: the end after ``a``). A sequence of ``n`` words
        has ``n + 1`` transitions; ``F`` is the expected count of each, ``E[count]``, over ``E[n] + 1``, which
        is what the pooled frequencies of many samples converge to:
        ``E[count(a, b)] = P(a, b) sum_n p(n) sum_{i<n} m_i(a)``, ``E[count(a, end)] = sum_n p(n) m_n(a)``."""
        v, m = self.vocab_size, self.marginals()  # m[i]: the law of word i + 1
        n = np.arange(len(self.length_probs))
        present = np.array([(self.length_probs * (n > i)).sum() for i in range(len(m))])  # P(n > i)
        last = np.array([self.length_probs[i + 1] for i in range(len(m))])  # P(n = i + 1)
        f = np.zeros((v + 1, v + 1))
        f[v, :v] = self.length_probs[1:].sum() * self.start
        # word i + 1 has a successor when n > i + 1
        f[:v, :v] = (present[1:, None] * m[:-1]).sum(0)[:, None] * self.trans
        f[:v, v] = (last[:, None] * m).sum(0)
        return f / ((self.length_probs * n).sum() + self.length_probs[1:].sum())

    # ---- files
    def to_json(self) -> dict:
        rows = {str(i): [[int(j), float(self.trans[i, j])] for j in np.nonzero(self.trans[i])[0]]
                for i in range(self.vocab_size)}
        return {"format": FORMAT, "seed": self.seed, "words": self.words, "start": self.start.tolist(),
                "transitions": rows, "length_probs": self.length_probs.tolist(), "entropy": self.entropy()}

    def save(self, path: str) -> str:
        return write_json_atomic(path, self.to_json(), indent=None)

    @classmethod
    def load(cls, path: str) -> "SyntheticLanguage":
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("format") != FORMAT:
            raise ValueError(f"{path} is not a synthetic language file ({FORMAT})")
        v = len(d["words"])
        trans = np.zeros((v, v))
        for i, row in d["transitions"].items():
            for j, p in row:
                trans[int(i), j] = p
        return cls(d["words"], np.array(d["start"]), trans, np.array(d["length_probs"]), d.get("seed", 0))


def reverse_map_pairs(language: SyntheticLanguage, count: int, seed: int, min_len: int = 5,
                      max_len: int = 20) -> list[dict]:
    """``count`` DiffuSeq-style ``{"src", "trg"}`` pairs: src is a sequence of ``language`` cut to
    ``min_len..max_len`` words (shorter draws are redrawn), trg is src reversed with each word mapped
    through :func:`bijection`. Deterministic in ``seed``."""
    mapping = bijection(language)
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < count:
        for src in language.sample(count, int(rng.integers(2**31))):
            if len(src) < min_len:
                continue
            src = src[:max_len]
            pairs.append({"src": " ".join(src), "trg": " ".join(mapping[w] for w in reversed(src))})
            if len(pairs) == count:
                break
    return pairs


def bijection(language: SyntheticLanguage) -> dict[str, str]:
    """A fixed permutation of the words (seeded by the language's seed), with no fixed point."""
    v = language.vocab_size
    perm = np.random.default_rng(language.seed + 7919).permutation(v)
    perm = np.where(perm == np.arange(v), (perm + 1) % v, perm) if v > 1 else perm
    if len(set(perm.tolist())) != v:  # the fix-up above collided: fall back to a shift by one
        perm = (np.arange(v) + 1) % v
    return {language.words[i]: language.words[int(perm[i])] for i in range(v)}


def write_tokenizer(words: list[str], out_dir: str, hidden_size: int = 128, num_layers: int = 2,
                    num_heads: int = 4, max_position: int = 64, spare: int = 0) -> str:
    """A word-level BERT tokenizer over ``SPECIALS + words`` and a small BERT config in ``out_dir``
    (``from_pretrained`` loads both; no weights: train with ``--from_scratch``). ``spare``: that many
    ``[unused<k>]`` entries after the words, as BERT's vocabulary has (``--time_conditioning token``
    needs one per diffusion step)."""
    from transformers import BertConfig, BertTokenizer  # transformers 5: backed by `tokenizers`

    os.makedirs(out_dir, exist_ok=True)
    entries = list(SPECIALS) + list(words) + [f"[unused{k}]" for k in range(spare)]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(entries)}, do_lower_case=True)
    tok.save_pretrained(out_dir)
    BertConfig(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers,
               num_attention_heads=num_heads, intermediate_size=4 * hidden_size,
               max_position_embeddings=max_position, pad_token_id=tok.pad_token_id).save_pretrained(out_dir)
    return out_dir


def write_lm_folder(language: SyntheticLanguage, out_dir: str, n_train: int, n_valid: int, n_test: int,
                    seed: int = 1) -> dict:
    """``train.txt``/``valid.txt``/``test.txt`` (one sequence per line, as ``--dataset text`` reads them)
    and ``language.json``; returns the exact test NLL summary of :func:`score`."""
    os.makedirs(out_dir, exist_ok=True)
    splits = {}
    for k, (name, n) in enumerate((("train", n_train), ("valid", n_valid), ("test", n_test))):
        splits[name] = language.sample(n, seed * 1000 + k)
        write_text_atomic(os.path.join(out_dir, f"{name}.txt"), "".join(" ".join(s) + "\n" for s in splits[name]))
    language.save(os.path.join(out_dir, "language.json"))
    return score(language, [" ".join(s) for s in splits["test"]])


def write_seq2seq_folder(language: SyntheticLanguage, out_dir: str, n_train: int, n_valid: int, n_test: int,
                         seed: int = 2, min_len: int = 5, max_len: int = 20) -> None:
    """A DiffuSeq folder (``train.jsonl``/``valid.jsonl``/``test.jsonl``) of :func:`reverse_map_pairs`."""
    os.makedirs(out_dir, exist_ok=True)
    for k, (name, n) in enumerate((("train", n_train), ("valid", n_valid), ("test", n_test))):
        pairs = reverse_map_pairs(language, n, seed * 1000 + k, min_len, max_len)
        write_text_atomic(os.path.join(out_dir, f"{name}.jsonl"), "".join(json.dumps(p) + "\n" for p in pairs))
    language.save(os.path.join(out_dir, "language.json"))


def score(language: SyntheticLanguage, lines: list[str]) -> dict:
    """Exact NLL of text lines under ``language``: ``nll_per_token`` over the lines with a finite
    likelihood, its standard error, and the fraction of lines with a forbidden transition (or unknown
    word, or impossible length)."""
    seqs = [line.split() for line in lines]
    lp = np.array([language.log_prob(s) for s in seqs])
    ok = np.isfinite(lp)
    tokens = np.array([len(s) for s in seqs])
    forbidden = np.array([language.forbidden_transitions(s) > 0 for s in seqs])
    n_ok = int(ok.sum())
    res = {"sequences": len(seqs), "scored": n_ok, "invalid_fraction": float(1 - ok.mean()) if len(seqs) else 0.0,
           "forbidden_fraction": float(forbidden.mean()) if len(seqs) else 0.0,
           "mean_length": float(tokens.mean()) if len(seqs) else 0.0}
    if n_ok:
        per_seq = -lp[ok]
        res["nll_per_token"] = float(per_seq.sum() / tokens[ok].sum())
        res["nll_per_token_se"] = ratio_standard_error(per_seq.tolist(), tokens[ok].tolist())
    return res


def bigram_tv(language: SyntheticLanguage, lines: list[str]) -> float:
    """Total-variation distance between the pooled transition frequencies of ``lines`` (boundary -> first
    word, each adjacent pair, last word -> boundary: ``n + 1`` per line of ``n`` words) and the language's
    expected ones (:meth:`SyntheticLanguage.expected_bigrams`), ``0.5 sum |f_lines - F|``. Unknown words are
    one symbol of expected frequency 0. Finite samples are not 0 even from the language itself: compare with
    held-out lines of the same count."""
    if not lines:
        return math.nan
    v, expected = language.vocab_size, language.expected_bigrams()
    counts: dict[tuple[int, int], int] = {}
    for line in lines:
        ids = [v] + [language.index.get(w, v + 1) for w in line.split()] + [v]
        for pair in zip(ids, ids[1:]):
            counts[pair] = counts.get(pair, 0) + 1
    total = sum(counts.values())
    seen = [(c / total, expected[a, b] if max(a, b) <= v else 0.0) for (a, b), c in counts.items()]
    # the unseen transitions add their expected mass
    return 0.5 * (sum(abs(f - e) for f, e in seen) + 1.0 - sum(e for _, e in seen))


def distinct_fraction(lines: list[str]) -> float:
    """Distinct lines (as word sequences: whitespace is normalised) over lines."""
    return len({" ".join(line.split()) for line in lines}) / len(lines) if lines else math.nan


def score_chain(language: SyntheticLanguage, lines: list[str], joins: list[list[int]] | None = None) -> dict:
    """Exact scores of text made in blocks (``runtime.semi_ar``; docs/algorithms.md §1.13), each line one run of
    the chain: ``log p = log pi(w_1) + sum_{i>=1} log P(w_i | w_{i-1})``, with no length term (the length was
    asked for; the language's ``p(n)`` ends at its max_len). ``joins[k]``: the positions i (0-based) of line k
    whose transition (w_{i-1}, w_i) crosses from one block into the next; the other transitions are inside a
    block. Returns the forbidden rate per transition at the joins and inside (an unknown word makes the
    transitions into and out of it forbidden), the mean ``-log P`` of the allowed ones at each, the fraction of
    lines with a forbidden transition or an unknown first word, and the NLL per token (``nll_per_token``, with its
    standard error) over the other lines; ``nll_per_token_allowed``: over every line, ``-log`` of its allowed terms
    (``pi(w_1)`` and the transitions that are not forbidden) per such term, the forbidden ones counted only in the
    rates. Lines of one canvas have no joins (``joins`` None: none anywhere)."""
    joins = joins or [[] for _ in lines]
    if len(joins) != len(lines):
        raise ValueError(f"{len(lines)} lines but {len(joins)} lists of joins")
    count = {"join": [0, 0, 0.0, 0], "inside": [0, 0, 0.0, 0]}  # transitions, forbidden, -log P allowed, allowed
    per_seq, tokens, bad = [], [], 0
    kept, kept_terms = [], []  # every line: -log p of its allowed terms (pi(w_1) and transitions), their count
    for line, where in zip(lines, joins):
        ids = [language.index.get(w) for w in line.split()]
        at = set(where)
        p0 = language.start[ids[0]] if ids and ids[0] is not None else 0.0
        logp, nll, terms = (math.log(p0), -math.log(p0), 1) if p0 > 0 else (-math.inf, 0.0, 0)
        for i in range(1, len(ids)):
            c = count["join" if i in at else "inside"]
            p = language.trans[ids[i - 1], ids[i]] if ids[i - 1] is not None and ids[i] is not None else 0.0
            c[0] += 1
            if p > 0:
                c[2], c[3] = c[2] - math.log(p), c[3] + 1
                logp, nll, terms = logp + math.log(p), nll - math.log(p), terms + 1
            else:
                c[1], logp = c[1] + 1, -math.inf
        kept.append(nll)
        kept_terms.append(terms)
        if math.isfinite(logp) and ids:
            per_seq.append(-logp)
            tokens.append(len(ids))
        else:
            bad += 1
    res = {"sequences": len(lines), "scored": len(per_seq), "forbidden_fraction": bad / len(lines) if lines else 0.0}
    for k, (n, forbidden, nll, allowed) in count.items():
        res[f"{k}_transitions"] = n
        res[f"{k}_forbidden_rate"] = forbidden / n if n else None
        res[f"{k}_nll_per_transition"] = nll / allowed if allowed else None
    if per_seq:
        res["nll_per_token"] = sum(per_seq) / sum(tokens)
        res["nll_per_token_se"] = ratio_standard_error(per_seq, tokens)
    if sum(kept_terms):  # defined for every line: a long text rarely has no forbidden transition at all
        res["nll_per_token_allowed"] = sum(kept) / sum(kept_terms)
        res["nll_per_token_allowed_se"] = ratio_standard_error(kept, kept_terms)
    return res
