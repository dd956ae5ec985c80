"""Tests for evaluation.seq2seq and ``compute_metric.py --mode seq2seq``.

The oracles are (1) hand-computed values and (2) ``DiffuSeqEval`` below: DiffuSeq's current
``scripts/eval_seq2seq.py`` (commit e44113d and later; Tang et al.'s copy runs the same second
``get_bleu``) retyped function by function in plain python with nltk, torchmetrics and numpy, and
its ``__main__`` loop minus BERTScore. Its ``get_bleu(recover, reference)`` is
``sentence_bleu([reference.split()], recover.split(), method4)``: the generated text is the
hypothesis. The reversed order (DiffuSeq's first release, commit 8bfafcb, and DiffusionBERT's
``compute_metric.py``) is retyped as ``get_bleu_8bfafcb``.

Hand-computed values use nltk's method4: the m-th zero precision (m = 1, 2, ...) of a hypothesis
of length c > 1 becomes ``1 / (2**m * 5 / ln c) / den`` with den = max(1, #hyp n-grams); the
score is ``bp * (p1 p2 p3 p4) ** (1/4)`` with ``bp = exp(1 - r/c)`` when c <= r.
"""
from __future__ import annotations

import glob
import json
import math
import os
import random
import subprocess
import sys
import warnings

import nltk
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from conftest import run_script
from evaluation.seq2seq import (
    ORDERS,
    avg_len,
    avg_len_words,
    bert_score,
    bleu,
    decode_like_diffuseq,
    dist_1,
    div_4,
    evaluate_outputs,
    get_bleu,
    mbr_select,
    read_outputs,
    rouge_l,
    rouge_l_per_sentence,
    self_bleu,
    sentence_bleu_m4,
    strip_special,
)
from common.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LN2, LN4 = math.log(2), math.log(4)
# "a b c d" vs "a b d c" (either way round; both have 4 tokens): p1 = 4/4; bigrams (a,b) match
# of 3 -> 1/3; trigrams 0 of 2 -> first zero: 1/(2*5/ln4)/2 = ln4/20; 4-grams 0 of 1 -> second
# zero: 1/(4*5/ln4)/1 = ln4/20; bp = 1 (equal lengths).
B_ABCD_ABDC = (1 * (1 / 3) * (LN4 / 20) * (LN4 / 20)) ** 0.25
# "p q" vs itself: p1 = 2/2, p2 = 1/1, p3 = 0/1 -> 1/(2*5/ln2) = ln2/10, p4 = 0/1 -> 1/(4*5/ln2)
# = ln2/20; bp = 1. Identical two-word sentences do not score 1 under method4.
B_PQ = (1 * 1 * (LN2 / 10) * (LN2 / 20)) ** 0.25


def nltk_m4(hyp: str, ref: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sentence_bleu([ref.split()], hyp.split(), smoothing_function=SmoothingFunction().method4)


def write_rows(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for rec, ref, src in rows:
            f.write(json.dumps({"recover": rec, "reference": ref, "source": src}) + "\n")
    return str(path)


# --------------------------------------------------------------------------- DiffuSeq's script, retyped
# scripts/eval_seq2seq.py of Shark-NLP/DiffuSeq at its current commit, function by function (names
# kept, BERTScore left out). The only change: warnings from nltk are silenced.


def _sentence_bleu_m4(references, hypothesis):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sentence_bleu(references, hypothesis, smoothing_function=SmoothingFunction().method4)


def get_bleu_e44113d(recover, reference):
    """The current get_bleu (DiffuSeq e44113d; the second, running definition in Tang et al.'s)."""
    return _sentence_bleu_m4([reference.split()], recover.split())


def get_bleu_8bfafcb(recover, reference):
    """DiffuSeq's first release (8bfafcb) and DiffusionBERT's compute_metric.py: the reversed order."""
    return _sentence_bleu_m4([recover.split()], reference.split())


def select_best_index(sentences, get_bleu=get_bleu_e44113d):
    """selectBest, returning idx instead of sentences[idx]."""
    selfBleu = [[] for i in range(len(sentences))]
    for i, s1 in enumerate(sentences):
        for j, s2 in enumerate(sentences):
            score = get_bleu(s1, s2)
            selfBleu[i].append(score)
    for i, s1 in enumerate(sentences):
        selfBleu[i][i] = 0
    idx = np.argmax(np.sum(selfBleu, -1))
    return int(idx)


def diversityOfSet(sentences, get_bleu=get_bleu_e44113d):
    selfBleu = []
    for i, sentence in enumerate(sentences):
        for j in range(i + 1, len(sentences)):
            score = get_bleu(sentence, sentences[j])
            selfBleu.append(score)
    if len(selfBleu) == 0:
        selfBleu.append(0)
    div4 = distinct_n_gram_inter_sent(sentences, 4)
    return np.mean(selfBleu), div4


def distinct_n_gram(hypn, n):
    dist_list = []
    for hyp in hypn:
        hyp_ngrams = []
        hyp_ngrams += nltk.ngrams(hyp.split(), n)
        total_ngrams = len(hyp_ngrams)
        unique_ngrams = len(list(set(hyp_ngrams)))
        if total_ngrams == 0:
            return 0
        dist_list.append(unique_ngrams / total_ngrams)
    return np.mean(dist_list)


def distinct_n_gram_inter_sent(hypn, n):
    hyp_ngrams = []
    for hyp in hypn:
        hyp_ngrams += nltk.ngrams(hyp.split(), n)
    total_ngrams = len(hyp_ngrams)
    unique_ngrams = len(list(set(hyp_ngrams)))
    if total_ngrams == 0:
        return 0
    dist_n = unique_ngrams / total_ngrams
    return dist_n


def diffuseq_eval(folder, mbr, get_bleu=get_bleu_e44113d, sos="[CLS]", eos="[SEP]", sep="[SEP]", pad="[PAD]"):
    """The script's __main__ loop over ``sorted(glob(folder/*json))``; returns what it prints (no
    BERTScore): ``per_file`` metrics, then self-BLEU/div-4 or, with ``mbr``, the MBR metrics."""
    from torchmetrics.text.rouge import ROUGEScore
    rougeScore = ROUGEScore(rouge_keys="rougeL")  # the script's ROUGEScore() also computes rougeLsum,
    # which needs nltk's punkt data; rougeL is computed the same way either way

    files = sorted(glob.glob(f"{folder}/*json"))
    sample_num = 0
    with open(files[0], "r") as f:
        for row in f:
            sample_num += 1
    sentenceDict, referenceDict, sourceDict = {}, {}, {}
    for i in range(sample_num):
        sentenceDict[i], referenceDict[i], sourceDict[i] = [], [], []
    div4, selfBleu, out = [], [], {"per_file": []}
    for path in files:
        sources, references, recovers, bleu_, rougel, avg_len_, dist1 = [], [], [], [], [], [], []
        with open(path, "r") as f:
            cnt = 0
            for row in f:
                source = json.loads(row)["source"].strip()
                reference = json.loads(row)["reference"].strip()
                recover = json.loads(row)["recover"].strip()
                source = source.replace(eos, "").replace(sos, "")
                reference = reference.replace(eos, "").replace(sos, "").replace(sep, "")
                recover = recover.replace(eos, "").replace(sos, "").replace(sep, "").replace(pad, "")
                sources.append(source)
                references.append(reference)
                recovers.append(recover)
                avg_len_.append(len(recover.split(" ")))
                bleu_.append(get_bleu(recover, reference))
                rougel.append(rougeScore(recover, reference)["rougeL_fmeasure"].tolist())
                dist1.append(distinct_n_gram([recover], 1))
                sentenceDict[cnt].append(recover)
                referenceDict[cnt].append(reference)
                sourceDict[cnt].append(source)
                cnt += 1
        out["per_file"].append({"bleu": np.mean(bleu_), "rouge_l": np.mean(rougel), "dist_1": np.mean(dist1),
                                "avg_len": np.mean(avg_len_)})
    if len(files) > 1:
        if not mbr:
            for k, v in sentenceDict.items():
                if len(v) == 0:
                    continue
                sb, d4 = diversityOfSet(v, get_bleu)
                selfBleu.append(sb)
                div4.append(d4)
            out["self_bleu"], out["div_4"] = np.mean(selfBleu), np.mean(div4)
        else:
            bleu_, rougel, avg_len_, dist1, recovers, references, sources = [], [], [], [], [], [], []
            for k, v in sentenceDict.items():
                if len(v) == 0 or len(referenceDict[k]) == 0:
                    continue
                recovers.append(v[select_best_index(v, get_bleu)])
                references.append(referenceDict[k][0])
                sources.append(sourceDict[k][0])
            for (source, reference, recover) in zip(sources, references, recovers):
                bleu_.append(get_bleu(recover, reference))
                rougel.append(rougeScore(recover, reference)["rougeL_fmeasure"].tolist())
                avg_len_.append(len(recover.split(" ")))
                dist1.append(distinct_n_gram([recover], 1))
            out["mbr"] = {"bleu": np.mean(bleu_), "rouge_l": np.mean(rougel), "dist_1": np.mean(dist1),
                          "avg_len": np.mean(avg_len_)}
    return out


# --------------------------------------------------------------------------- stripping / reading


def test_strip_special_like_diffuseq():
    text = "  [CLS] a b [SEP] [PAD] [PAD] "
    # strip() first, then delete the tokens; the spaces around them stay.
    assert strip_special(text) == " a b   "
    assert strip_special(text, pad=False) == " a b  [PAD] [PAD]"  # DiffuSeq's reference treatment
    assert strip_special("x  y") == "x  y"  # no whitespace normalisation
    assert strip_special("[CLS][SEP][PAD]") == ""


def test_read_outputs_reads_rows(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"recover": "r1", "reference": "g1", "source": "s1", "extra": 3}\n'
                    '{"source": "s2", "reference": "g2", "recover": "r2"}\n', encoding="utf-8")
    assert read_outputs(str(path)) == [{"recover": "r1", "reference": "g1", "source": "s1"},
                                       {"recover": "r2", "reference": "g2", "source": "s2"}]


GOOD = '{"recover": "r", "reference": "g", "source": "s"}\n'


@pytest.mark.parametrize("content, line, message", [
    (GOOD + '{"recover": "r", "reference": "g", "source": \n', 2, "not valid JSON"),
    ('{"recover": "r", "source": "s"}\n', 1, "missing key(s) reference"),
    (GOOD + GOOD + '["r", "g", "s"]\n', 3, "expected a JSON object"),
    (GOOD + '{"recover": 5, "reference": "g", "source": "s"}\n', 2, "'recover' must be a string"),
    (GOOD + "\n" + GOOD, 2, "empty line"),
])
def test_read_outputs_errors_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_outputs(str(path))
    assert str(e.value).startswith(f"{path}:{line}: {message}")


def test_read_outputs_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_outputs(str(tmp_path / "nope.json"))
    (tmp_path / "empty.json").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="has no rows"):
        read_outputs(str(tmp_path / "empty.json"))
    (tmp_path / "latin.json").write_bytes('{"recover": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not valid UTF-8"):
        read_outputs(str(tmp_path / "latin.json"))


# --------------------------------------------------------------------------- decoded strings


def diffuseq_era_decode(tokens: list[str]) -> str:
    """What DiffuSeq's ``tokenizer.decode(ids)`` gave under transformers 4.22 with a fast BERT tokenizer:
    the WordPiece decoder joins the tokens with spaces and glues ``##`` pieces, then
    ``clean_up_tokenization`` (on by default there) is applied, retyped here. (tokenizers < 0.13 also
    rewrote " do not" as " don't" in its decoder; that is not reproduced.)"""
    text = " ".join(tokens).replace(" ##", "")
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
            .replace(" 've", "'ve").replace(" 're", "'re"))


# (text, what DiffuSeq writes for [CLS] text [SEP] [PAD]...), worked out by hand. Word pieces:
# cap ##ric ##orn, as ##cend ##ant, tab ##ern ##acle ##s, em ##bell ##ished.
DECODED = [
    ("I'm a triple Capricorn (Sun, Moon and ascendant in Capricorn). What does this say about me?",
     "[CLS] i'm a triple capricorn ( sun, moon and ascendant in capricorn ). what does this say about me? [SEP]"),
    ('Don\'t you think it\'s unbelievable, isn\'t it? Yes -- we\'ve seen "it" 3.5 times!',
     '[CLS] don\'t you think it\'s unbelievable, isn\'t it? yes - - we\'ve seen " it " 3. 5 times! [SEP]'),
    ("The Lord's tabernacles were embellished; they're gone.",
     "[CLS] the lord's tabernacles were embellished ; they're gone. [SEP]"),
]


@pytest.mark.parametrize("text, expected", DECODED)
def test_decode_like_diffuseq_by_hand(tok, text, expected):
    import torch

    ids = tok(text)["input_ids"]
    padded = ids + [tok.pad_token_id] * 3
    assert decode_like_diffuseq(tok, padded) == expected
    assert decode_like_diffuseq(tok, torch.tensor(padded)) == expected
    assert diffuseq_era_decode(tok.convert_ids_to_tokens(ids)) == expected


def test_decode_like_diffuseq_keeps_inner_padding(tok):
    # A generated target region: only the trailing [PAD]s go; a [PAD] before other tokens stays a word,
    # which DiffuSeq's eval script then deletes from recover.
    a, b = tok("a cat", add_special_tokens=False)["input_ids"], tok("sat", add_special_tokens=False)["input_ids"]
    pad, sep = tok.pad_token_id, tok.sep_token_id
    assert decode_like_diffuseq(tok, a + [sep, pad] + b + [pad, pad]) == "a cat [SEP] [PAD] sat"
    assert strip_special(decode_like_diffuseq(tok, a + [sep, pad] + b + [pad, pad])).split() == ["a", "cat", "sat"]
    assert decode_like_diffuseq(tok, [pad, pad]) == ""


def test_decode_like_diffuseq_on_real_verses(tok):
    from textdata.bible import load_verse_pairs

    pairs, _ = load_verse_pairs()
    texts = [t for p in pairs[:300] for t in (p.kjv, p.web)]
    changed = 0
    for text in texts:
        ids = tok(text)["input_ids"] + [tok.pad_token_id] * 2
        got = decode_like_diffuseq(tok, ids)
        assert got == diffuseq_era_decode(tok.convert_ids_to_tokens(ids[:-2])), text
        changed += got != tok.decode(ids[:-2], clean_up_tokenization_spaces=False)
    assert changed > 50  # the clean-up matters on real text ("lord's", "it?", "said,")


# --------------------------------------------------------------------------- BLEU


def test_sentence_bleu_equals_nltk_bit_for_bit():
    rng = random.Random(0)
    vocab = "a b c d e".split()

    def sent():  # lengths 0..8 cover empty, one-word and no-4-gram sentences
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 8)))

    for _ in range(3000):
        h, r = sent(), sent()
        assert sentence_bleu_m4(h, r) == nltk_m4(h, r), (h, r)
        assert get_bleu(h, r) == get_bleu_e44113d(h, r), (h, r)
        assert get_bleu(h, r, "reversed") == get_bleu_8bfafcb(h, r), (h, r)


def test_bleu_method4_by_hand():
    assert sentence_bleu_m4("a b c d", "a b d c") == pytest.approx(B_ABCD_ABDC, rel=1e-12)
    assert sentence_bleu_m4("p q", "p q") == pytest.approx(B_PQ, rel=1e-12)
    assert sentence_bleu_m4("a b", "c d") == 0.0  # no unigram match
    assert sentence_bleu_m4("", "a b") == 0.0

    # get_bleu(recover="a b c", reference="a b c d e"), DiffuSeq's current order: hypothesis
    # "a b c" (c = 3) vs "a b c d e" (r = 5): bp = exp(1 - 5/3); p1 = p2 = p3 = 1,
    # p4 = 0/1 -> 1/(2*5/ln3) = ln3/10.
    current = math.exp(1 - 5 / 3) * (math.log(3) / 10) ** 0.25
    # Reversed (DiffuSeq 8bfafcb, DiffusionBERT): hypothesis = the gold "a b c d e" (c = 5) vs "a b c"
    # (r = 3): bp = 1 (c > r); p1 = 3/5, p2 = 2/4, p3 = 1/3, p4 = 0/2 -> 1/(2*5/ln5)/2 = ln5/20.
    reversed_ = (3 / 5 * 2 / 4 * 1 / 3 * math.log(5) / 20) ** 0.25
    assert get_bleu("a b c", "a b c d e") == pytest.approx(current, rel=1e-12)
    assert get_bleu("a b c", "a b c d e", "reversed") == pytest.approx(reversed_, rel=1e-12)
    assert abs(current - reversed_) > 1e-3

    hyps, refs = ["a b c", "a b c d", " p  q "], ["a b c d e", "a b d c", "p q"]
    assert bleu(hyps, refs) == pytest.approx((current + B_ABCD_ABDC + B_PQ) / 3, rel=1e-12)
    assert bleu(hyps, refs, order="reversed") == pytest.approx((reversed_ + B_ABCD_ABDC + B_PQ) / 3, rel=1e-12)
    assert ORDERS == ("diffuseq", "reversed")
    with pytest.raises(ValueError, match="unknown BLEU order"):
        bleu(hyps, refs, order="usual")


# --------------------------------------------------------------------------- ROUGE-L, dist-1, length


def test_rouge_l_by_hand():
    # LCS("a b c d e", "a c e f") = "a c e" = 3; P = 3/5, R = 3/4, F = 2PR/(P+R) = (9/10)/(27/20) = 2/3.
    assert rouge_l_per_sentence(["a b c d e"], ["a c e f"])[0] == pytest.approx(2 / 3, abs=1e-6)
    # torchmetrics lower-cases and drops punctuation: identical after normalisation -> 1.
    assert rouge_l_per_sentence(["The Cat!"], ["the cat"])[0] == pytest.approx(1.0, abs=1e-6)
    # LCS("x y", "y x") = 1: P = R = F = 1/2; the mean is per sentence: (2/3 + 1/2) / 2 = 7/12.
    assert rouge_l(["a b c d e", "x y"], ["a c e f", "y x"]) == pytest.approx(7 / 12, abs=1e-6)
    assert rouge_l([""], ["a b"]) == 0.0


def test_rouge_l_equals_the_rougescore_module():
    from torchmetrics.text.rouge import ROUGEScore

    module = ROUGEScore(rouge_keys="rougeL")
    pairs = [("the cat sat on the mat", "a cat was on the mat"), ("how do i learn ?", "how can i learn python")]
    for h, r in pairs:
        assert rouge_l_per_sentence([h], [r])[0] == module(h, r)["rougeL_fmeasure"].tolist()


def test_dist_1_and_lengths_by_hand():
    # "a a b": 2 unique / 3; "" counts as 0 (DiffuSeq returns 0, it does not skip it); "x y": 1.
    assert dist_1(["a a b", "", "x y"]) == pytest.approx((2 / 3 + 0 + 1) / 3, abs=1e-15)
    # DiffuSeq's length: split(' '), so " a b  " (what "[CLS] a b [SEP] [PAD]" strips to) is
    # ['', 'a', 'b', '', ''] = 5 pieces; "a b c" = 3 -> mean 4. Word count: (2 + 3) / 2.
    stripped = [strip_special("[CLS] a b [SEP] [PAD]"), "a b c"]
    assert avg_len(stripped) == 4.0
    assert avg_len_words(stripped) == 2.5


# --------------------------------------------------------------------------- across candidates


def test_div_4_by_hand():
    # Source 1: 4-grams (a,b,c,d), (b,c,d,e) | (a,b,c,d) | none -> 2 unique of 3.
    # Source 2: (a,b,c,d) twice -> 1 of 2. Mean over sources: (2/3 + 1/2) / 2 = 7/12.
    cands = [["a b c d e", "a b c d", "x y"], ["a b c d", "a b c d"]]
    assert div_4(cands) == pytest.approx(7 / 12, abs=1e-15)
    assert div_4([["a b", "c d e"]]) == 0.0  # no 4-gram at all


def test_self_bleu_by_hand():
    # Source 1, pairs i < j: (0,1) = B_ABCD_ABDC, (0,2) = (1,2) = 0 (no shared word) -> mean / 3.
    # Source 2: all three pairs are "p q" vs "p q" = B_PQ. Then the mean over the two sources.
    cands = [["a b c d", "a b d c", "x y z"], ["p q", "p q", "p q"]]
    assert self_bleu(cands) == pytest.approx((B_ABCD_ABDC / 3 + B_PQ) / 2, rel=1e-12)
    # The pair (c_0, c_1) scores get_bleu(c_0, c_1) = sentence_bleu([c_1], c_0): see
    # test_bleu_method4_by_hand for these two values.
    current = math.exp(1 - 5 / 3) * (math.log(3) / 10) ** 0.25
    reversed_ = (3 / 5 * 2 / 4 * 1 / 3 * math.log(5) / 20) ** 0.25
    assert self_bleu([["a b c", "a b c d e"]]) == pytest.approx(current, rel=1e-12)
    assert self_bleu([["a b c", "a b c d e"]], order="reversed") == pytest.approx(reversed_, rel=1e-12)
    assert self_bleu([["only one"]]) == 0.0


def test_mbr_picks_the_consensus():
    cands = [
        ["w x y z", "a b c d e", "a b c d f", "a b c x e"],  # index 1 shares most with the others
        ["one two three four", "the cat sat on the mat", "the cat sat on a mat", "the cat sat on the mat"],
    ]
    assert mbr_select(cands) == [1, 1]  # 1 and 3 tie in row 2: the lower index wins
    assert mbr_select([["a b", "c d", "e f"]]) == [0]  # all scores 0: the lowest index


def test_mbr_uses_diffuseq_argument_order():
    # Candidate i scores sum_j get_bleu(c_i, c_j) = sum_j BLEU(hyp=c_i | ref=c_j); "b" shares nothing.
    # c0 = "a": BLEU(hyp "a" | ref "a a") = bp = exp(1 - 2/1) ~ 0.368 (one word: only p1 = 1 counts).
    # c1 = "a a": BLEU(hyp "a a" | ref "a") = (1/2 * ln2/10 * ln2/20 * ln2/40)^(1/4) ~ 0.0675.
    # The reversed order (DiffuSeq 8bfafcb, DiffusionBERT) swaps the two scores and picks 1.
    s1 = (0.5 * (LN2 / 10) * (LN2 / 20) * (LN2 / 40)) ** 0.25
    assert s1 < math.exp(-1)
    assert mbr_select([["a", "a a", "b"]]) == [0]
    assert mbr_select([["a", "a a", "b"]], order="reversed") == [1]


def random_candidates(rng, num_sources, num_cands, special=True):
    """Candidates as decoded files hold them: [CLS]/[SEP], [PAD] inside and at the end, empty ones, and
    copies of one another (exact ties, also between strings that differ only in special tokens)."""
    vocab = "the a cat dog sat on mat ? ,".split()
    out = []
    for _ in range(num_sources):
        cands = []
        for _ in range(num_cands):
            words = [rng.choice(vocab) for _ in range(rng.randint(0, 7))]
            if cands and rng.random() < 0.3:
                words = strip_special(rng.choice(cands)).split()  # a copy: a tie
            if special:
                cut = rng.randint(0, len(words))
                text = " ".join(["[CLS]"] + words[:cut] + ["[SEP]"] + ["[PAD]"] * rng.randint(0, 2) + words[cut:])
                text += " [PAD]" * rng.randint(0, 2)
            else:
                text = " ".join(words)
            cands.append(text)
        out.append(cands)
    return out


@pytest.mark.parametrize("order", ORDERS)
def test_mbr_and_self_bleu_match_the_literal_script(order):
    get = {"diffuseq": get_bleu_e44113d, "reversed": get_bleu_8bfafcb}[order]
    rng = random.Random(3)
    cands = random_candidates(rng, 120, 5)
    stripped = [[strip_special(c) for c in cs] for cs in cands]
    assert mbr_select(stripped, order=order) == [select_best_index(cs, get) for cs in stripped]
    assert self_bleu(stripped, order=order) == float(np.mean([diversityOfSet(cs, get)[0] for cs in stripped]))
    assert div_4(stripped) == float(np.mean([diversityOfSet(cs, get)[1] for cs in stripped]))
    # the sample has ties and cases where the order decides
    assert any(len(set(cs)) < len(cs) for cs in stripped)
    assert mbr_select(stripped, "diffuseq") != mbr_select(stripped, "reversed")


# --------------------------------------------------------------------------- whole evaluation vs DiffuSeq's loop


def write_folder(folder, files) -> list[str]:
    folder.mkdir(exist_ok=True)
    paths = []
    for k, rows in enumerate(files):
        paths.append(write_rows(folder / f"seed{k}_step0.json",
                                [(r["recover"], r["reference"], r["source"]) for r in rows]))
    return paths


def random_outputs(seed, num_sources=12, num_files=4):
    rng = random.Random(seed)
    vocab = "the a cat dog sat ran on mat ? ,".split()

    def sent(lo=0):
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, 9)))

    sources = [f"[CLS] {sent(1)} [SEP] [SEP]" for _ in range(num_sources)]
    # DiffuSeq deletes [PAD] from recover only: a reference keeps it as a word.
    refs = [f"[CLS] {sent(1)} [SEP]" + " [PAD]" * rng.randint(0, 1) for _ in range(num_sources)]
    cands = random_candidates(rng, num_sources, num_files)
    return [[{"recover": cands[i][k], "reference": refs[i], "source": sources[i]} for i in range(num_sources)]
            for k in range(num_files)]


@pytest.mark.parametrize("use_mbr", [False, True])
def test_evaluate_outputs_equals_diffuseq_loop(tmp_path, use_mbr):
    files = random_outputs(5)
    write_folder(tmp_path / "run", files)
    want = diffuseq_eval(tmp_path / "run", use_mbr)
    got = evaluate_outputs(files, bertscore_model=None, mbr=use_mbr)
    for k, per_file in enumerate(want["per_file"]):
        for key, value in per_file.items():
            assert got["per_file"][k][key] == float(value), (k, key)
    headline = want["mbr"] if use_mbr else want["per_file"][0]
    for key, value in headline.items():
        assert got[key] == float(value), key
    if not use_mbr:  # the script prints these only without --mbr
        assert (got["self_bleu"], got["div_4"]) == (float(want["self_bleu"]), float(want["div_4"]))
    assert got["num_files"] == 4 and len(got["per_file"]) == 4 and "bertscore_f1" not in got


def test_evaluate_outputs_reversed_order_equals_the_first_release(tmp_path):
    files = random_outputs(6)
    write_folder(tmp_path / "run", files)
    got = evaluate_outputs(files, bertscore_model=None, mbr=True, mbr_order="reversed")
    mbr = diffuseq_eval(tmp_path / "run", True, get_bleu_8bfafcb)["mbr"]
    plain = diffuseq_eval(tmp_path / "run", False, get_bleu_8bfafcb)
    assert got["bleu_reversed"] == float(mbr["bleu"]) and got["rouge_l"] == float(mbr["rouge_l"])
    assert got["self_bleu_reversed"] == float(plain["self_bleu"])
    assert got["per_file"][0]["bleu_reversed"] == float(plain["per_file"][0]["bleu"])
    assert got["metrics_on"] == "MBR choice among 4 candidates per source (reversed BLEU order)"
    assert got["mbr_choice"] != evaluate_outputs(files, bertscore_model=None, mbr=True)["mbr_choice"]


def test_evaluate_outputs_rejects_different_sources():
    a = [{"recover": "x", "reference": "y", "source": "[CLS] s1 [SEP]"}, {"recover": "x", "reference": "y", "source": "s2"}]
    b = [{"recover": "x", "reference": "y", "source": "s1"}, {"recover": "x", "reference": "y", "source": "s3"}]
    assert evaluate_outputs([a, [dict(r) for r in a]], bertscore_model=None)["num_sources"] == 2
    with pytest.raises(UserError, match=r"^B:2: source differs from A:2"):
        evaluate_outputs([a, b], bertscore_model=None, names=["A", "B"])  # row 1 matches once stripped
    with pytest.raises(UserError, match="B has 1 rows but A has 2"):
        evaluate_outputs([a, a[:1]], bertscore_model=None, names=["A", "B"])


# --------------------------------------------------------------------------- BERTScore


def test_bert_score_minilm():
    hyps = ["the cat sat on the mat", "how do i learn python quickly ?", "stock markets fell sharply today", ""]
    refs = ["the cat sat on the mat", "what is the fastest way to learn python ?", "my grandmother bakes bread", "hello"]
    res = bert_score(hyps, refs, batch_size=2)
    f = res.f1_per_sentence
    assert f[0] == pytest.approx(1.0, abs=1e-5)  # identical pair
    assert f[2] < f[1] < 1 - 1e-3  # unrelated < paraphrase < identical
    assert f[3] == 0.0  # empty hypothesis: bert-score's 0
    assert res.name == "minilm layer 6/6" and res.f1 == pytest.approx(np.mean(f), abs=1e-7)  # float32 mean
    assert res.package.startswith("bert-score ")

    swapped = bert_score(refs, hyps, batch_size=2)  # the same batches: bert-score's padding enters the maxima
    assert swapped.precision_per_sentence == pytest.approx(res.recall_per_sentence, abs=1e-6)
    assert swapped.recall_per_sentence == pytest.approx(res.precision_per_sentence, abs=1e-6)
    assert swapped.f1_per_sentence == pytest.approx(f, abs=1e-6)
    assert res.precision_per_sentence[1] != pytest.approx(res.recall_per_sentence[1], abs=1e-4)

    low = bert_score(hyps[:3], refs[:3], layer=2)
    assert low.name == "minilm layer 2/6" and low.f1 != pytest.approx(np.mean(f[:3]), abs=1e-4)
    with pytest.raises(UserError, match="layer must be in 0..6"):
        bert_score(hyps, refs, layer=7)


# --------------------------------------------------------------------------- CLI


# Two sources, three seeds. Per-source candidates (after stripping):
#   source 0: "a b c d", "a b d c", "x y z"     source 1: "p q", "p q", "p q"
SEEDS = [
    [("[CLS] a b c d [SEP] [PAD]", "[CLS] a b c d [SEP]", "[CLS] src zero [SEP]"),
     ("[CLS] p q [SEP]", "[CLS] p q [SEP]", "[CLS] src one [SEP]")],
    [("a b d c", "a b c d", "src zero"), ("p q [PAD]", "p q", "src one")],
    [("x y z", "a b c d", "src zero"), ("p q", "p q", "src one")],
]


def make_seeds(folder):
    folder.mkdir(exist_ok=True)
    return [write_rows(folder / f"seed{k}.json", rows) for k, rows in enumerate(SEEDS)]


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def err_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_cli_single_file(tmp_path, capsys):
    first = make_seeds(tmp_path / "run")[0]
    assert run_script("compute_metric.py", "--mode", "seq2seq", "--samples", first) == 0
    out = capsys.readouterr().out
    assert "bleu" in out and "minilm layer 6/6" in out
    report = load(first + ".seq2seq_metrics.json")
    m = report["metrics"]
    # Row 1: "a b c d" vs itself -> 1; row 2: "p q" vs itself -> B_PQ.
    assert m["bleu"] == pytest.approx((1 + B_PQ) / 2, rel=1e-12)
    assert m["rouge_l"] == pytest.approx(1.0, abs=1e-6)
    assert m["bertscore_f1"] == pytest.approx(1.0, abs=1e-5) and m["bertscore_model"] == "minilm layer 6/6"
    assert m["dist_1"] == 1.0
    # " a b c d  " -> 7 pieces, " p q " -> 4 pieces (DiffuSeq's split(' ')); words: 4 and 2.
    assert (m["avg_len"], m["avg_len_words"]) == (5.5, 3.0)
    assert "self_bleu" not in m and m["num_files"] == 1 and m["num_sources"] == 2
    assert report["mode"] == "seq2seq" and "method4" in report["conventions"]


def test_cli_folder_of_seeds(tmp_path, capsys):
    folder = tmp_path / "run"
    make_seeds(folder)
    args = ["--mode", "seq2seq", "--samples", str(folder), "--bertscore_model", "none"]
    assert run_script("compute_metric.py", *args) == 0
    assert "per file:" in capsys.readouterr().out
    report = load(folder / "seq2seq_metrics.json")
    m = report["metrics"]
    assert m["self_bleu"] == pytest.approx((B_ABCD_ABDC / 3 + B_PQ) / 2, rel=1e-12)  # see test_self_bleu_by_hand
    # div-4: source 0 has 4-grams (a,b,c,d), (a,b,d,c) -> 2/2 = 1; source 1 has none -> 0.
    assert m["div_4"] == 0.5
    assert m["bleu"] == pytest.approx((1 + B_PQ) / 2, rel=1e-12) and m["metrics_on"] == "the first file"
    # Seed 2 ("x y z" vs "a b c d": no match; "p q" -> B_PQ).
    assert [f["bleu"] for f in m["per_file"]] == pytest.approx([(1 + B_PQ) / 2, (B_ABCD_ABDC + B_PQ) / 2, B_PQ / 2])
    assert "bertscore_f1" not in m
    assert [os.path.basename(f) for f in report["inputs"]["files"]] == ["seed0.json", "seed1.json", "seed2.json"]

    # Re-running on the folder skips the metrics file now in it, and --mbr picks per source:
    # source 0 scores B, B, 0 (tie -> "a b c d"), source 1 all tie -> seed 0: same as the first file.
    assert run_script("compute_metric.py", *args + ["--mbr", "--overwrite"]) == 0
    m2 = load(folder / "seq2seq_metrics.json")["metrics"]
    assert m2["num_files"] == 3 and m2["metrics_on"].startswith("MBR")
    assert m2["bleu"] == m["bleu"] and m2["self_bleu"] == m["self_bleu"]

    # Files given one by one behave like the folder.
    files = [str(folder / f"seed{k}.json") for k in range(3)]
    assert run_script("compute_metric.py", "--mode", "seq2seq", "--samples", *files, "--bertscore_model", "none") == 0
    m3 = load(files[0] + ".seq2seq_metrics.json")["metrics"]
    assert (m3["self_bleu"], m3["div_4"]) == (m["self_bleu"], m["div_4"])


@pytest.mark.parametrize("use_mbr", [False, True])
def test_cli_folder_equals_the_literal_script(tmp_path, capsys, use_mbr):
    folder = tmp_path / "run"
    write_folder(folder, random_outputs(7))
    want = diffuseq_eval(folder, use_mbr)  # before the metrics file joins the folder's *json
    args = ["--mode", "seq2seq", "--samples", str(folder), "--bertscore_model", "none"]
    assert run_script("compute_metric.py", *args + (["--mbr"] if use_mbr else [])) == 0
    m = load(folder / "seq2seq_metrics.json")["metrics"]
    headline = want["mbr"] if use_mbr else want["per_file"][0]
    assert {k: m[k] for k in headline} == {k: float(v) for k, v in headline.items()}
    assert [{k: f[k] for k in headline} for f in m["per_file"]] == [
        {k: float(v) for k, v in f.items()} for f in want["per_file"]]
    if not use_mbr:
        assert (m["self_bleu"], m["div_4"]) == (float(want["self_bleu"]), float(want["div_4"]))
        return
    # The reversed order is a named option: the choice changes, and the report says so.
    assert run_script("compute_metric.py", *args + ["--mbr", "--mbr_order", "reversed", "--overwrite"]) == 0
    r = load(folder / "seq2seq_metrics.json")
    assert r["metrics"]["metrics_on"].endswith("(reversed BLEU order)") and r["inputs"]["mbr_order"] == "reversed"
    assert r["metrics"]["mbr_choice"] != m["mbr_choice"]
    assert run_script("compute_metric.py", *args + ["--mbr_order", "reversed", "--overwrite"]) == 2
    assert err_lines(capsys) == ["error: --mbr_order only changes the --mbr choice; give --mbr too"]


def test_cli_mismatched_sources_is_one_error_line(tmp_path, capsys):
    files = make_seeds(tmp_path / "run")
    bad = write_rows(tmp_path / "run" / "seed3.json",
                     [("a", "a b c d", "src zero"), ("p", "p q", "another source")])
    assert run_script("compute_metric.py", "--mode", "seq2seq", "--samples", files[0], bad, "--bertscore_model", "none") == 2
    err = err_lines(capsys)
    assert err == [f"error: {bad}:2: source differs from {files[0]}:2; "
                   "the files must hold the same sources in the same order"]
    assert not os.path.exists(files[0] + ".seq2seq_metrics.json")

    short = write_rows(tmp_path / "short.json", [("a", "a b c d", "src zero")])
    assert run_script("compute_metric.py", "--mode", "seq2seq", "--samples", files[0], short, "--bertscore_model", "none") == 2
    assert "has 1 rows but" in err_lines(capsys)[0]


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    folder = tmp_path / "run"
    make_seeds(folder)
    out = tmp_path / "m.json"
    args = ["--mode", "seq2seq", "--samples", str(folder), "--bertscore_model", "none", "--out", str(out)]
    assert run_script("compute_metric.py", *args) == 0
    before = out.read_text(encoding="utf-8")
    assert run_script("compute_metric.py", *args + ["--mbr"]) == 2
    err = err_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: output file {out} already exists")
    assert out.read_text(encoding="utf-8") == before
    assert run_script("compute_metric.py", *args + ["--mbr", "--overwrite"]) == 0
    assert load(out)["inputs"]["mbr"] is True


def test_cli_argument_errors(tmp_path, capsys):
    folder = tmp_path / "run"
    files = make_seeds(folder)
    # unconditional mode still takes exactly one --samples file
    assert run_script("compute_metric.py", "--samples", files[0], files[1], "--references", files[0]) == 2
    assert "takes one --samples file, got 2" in err_lines(capsys)[0]
    assert run_script("compute_metric.py", "--mode", "seq2seq", "--samples", files[0], "--references", files[0]) == 2
    assert "--references is not used in seq2seq mode" in err_lines(capsys)[0]
    assert run_script("compute_metric.py", "--mode", "seq2seq", "--samples", files[0], "--mbr", "--bertscore_model", "none") == 2
    assert "--mbr needs at least 2" in err_lines(capsys)[0]
    assert run_script("compute_metric.py", "--mode", "seq2seq", "--samples", files[0], str(folder), "--out",
                      str(tmp_path / "x.json")) == 2
    assert "is a folder" in err_lines(capsys)[0]
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert run_script("compute_metric.py", "--mode", "seq2seq", "--samples", str(empty)) == 2
    assert "holds no *json output files" in err_lines(capsys)[0]


def test_cli_process_end_to_end(tmp_path):
    folder = tmp_path / "run"
    make_seeds(folder)
    cmd = [sys.executable, os.path.join(REPO_ROOT, "compute_metric.py"), "--mode", "seq2seq",
           "--samples", str(folder), "--bertscore_model", "none"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "self_bleu" in proc.stdout and "div_4" in proc.stdout
    assert load(folder / "seq2seq_metrics.json")["metrics"]["div_4"] == 0.5
    bad = write_rows(folder / "seed9.json", [("a", "b", "c")])
    proc = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, cwd=str(tmp_path), env=env,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad} has 1 rows but {folder / 'seed0.json'} has 2; "
        "the files must hold the same sources in the same order"]
