"""The seq2seq canvas flags against transcriptions of the released code written here:

* ``--canvas released``: DiffusionBERT's ``dataloader.py`` (the loaders' ``add_prompt``,
  ``convert_to_features`` and ``ConditionalLoader.collate_fn``), in training and in decoding;
* ``--pad_to longest``: the batch padded to its longest pair (``pad_sequence``), the target region running
  to the end of the row as the released ``target_mask`` does;
* ``--truncation diffuseq``: DiffuSeq's ``merge_and_mask`` loop (``diffuseq/text_datasets.py``).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from conditional_data import PairCollator, fit_pair, tokenize_pairs
from runtime.assemble import load_task_data
from runtime.config import TrainConfig
from tests.conftest import one_error_line, run_here

QUIET = dict(log=lambda *_: None)


def _dsdict(rows):
    from datasets import Dataset, DatasetDict
    return DatasetDict(train=Dataset.from_list(rows))


# --- transcriptions of the released code ------------------------------------------------------------------

def released_add_prompt(task: str, src: str) -> str:
    """DiffusionBERT dataloader.py: QQPLoader / QTLoader / WikiLoader / CCLoader ``add_prompt``."""
    return {"qqp": '"' + src + '" is equal to "', "QT": ' Answer: ' + src + ' Question: ',
            "wiki": '"' + src + '" can be summarized as: ', "CC": src + ' - '}[task]


def released_collate(tok, pairs, task):
    """DiffusionBERT ``convert_to_features`` (no special tokens; its 128-token truncation never bites here)
    and ``ConditionalLoader.collate_fn``: (input_ids [B, L], target_mask [B, L])."""
    # batch_encode_plus(..., add_special_tokens=False), which transformers 5 calls __call__
    src = tok([released_add_prompt(task, s) for s, _ in pairs], add_special_tokens=False)
    trg = tok([t for _, t in pairs], add_special_tokens=False)
    d = [{"source": s, "target": t} for s, t in zip(src["input_ids"], trg["input_ids"])]
    input_ids = pad_sequence([torch.tensor([tok.cls_token_id] + x["source"] + x["target"] + [tok.sep_token_id])
                              for x in d], batch_first=True)
    target_mask = torch.stack([torch.cat([torch.zeros(len(x["source"]) + 1),
                                          torch.ones(input_ids.size(1) - len(x["source"]) - 1)]) for x in d])
    return input_ids, target_mask


def released_merge_and_mask(x_ids, y_ids, seq_len):
    """DiffuSeq ``helper_tokenize.merge_and_mask`` on one pair encoded with the special tokens
    (``[CLS] x [SEP]``, ``[CLS] y [SEP]``): the kept source and target words."""
    end_token = x_ids[-1]
    src, trg = list(x_ids[:-1]), list(y_ids[:-1])
    while len(src) + len(trg) > seq_len - 3:
        if len(src) > len(trg):
            src.pop()
        elif len(src) < len(trg):
            trg.pop()
        else:
            src.pop()
            trg.pop()
    src.append(end_token)
    trg.append(end_token)
    return src[1:-1], trg[1:-1]  # without [CLS] and the end token


PAIRS = [("How do I learn Python quickly?", "What is the fastest way to learn Python?"),
         ("Why is the sky blue?", "What makes the sky look blue?"),
         ("Is it safe to eat raw cookie dough that contains eggs and flour?", "Can I eat raw cookie dough?")]


@pytest.mark.parametrize("dataset,task", [("qqp", "qqp"), ("quasar_t", "QT"), ("wiki_auto", "wiki"),
                                          ("commonsense_conversation", "CC")])
def test_released_canvas_is_dataloader_collate(tok, dataset, task):
    rows = [{"src": s, "trg": t} for s, t in PAIRS]
    data = tokenize_pairs(_dsdict(rows), tok, max_len=128, canvas="released", dataset=dataset, **QUIET)["train"]
    batch = PairCollator(tok.pad_token_id)([data[i] for i in range(len(rows))])  # --pad_to longest
    want_ids, want_mask = released_collate(tok, PAIRS, task)
    assert tok.pad_token_id == 0  # pad_sequence pads with 0, which is BERT's [PAD]
    assert torch.equal(batch["input_ids"], want_ids)
    assert torch.equal(batch["noise_mask"], want_mask.bool())  # padding to the batch's longest row included
    assert bool((batch["attention_mask"] == 1).all())


def test_released_canvas_without_a_released_prompt_is_the_bare_layout(tok):
    rows = [{"src": s, "trg": t} for s, t in PAIRS]
    logs = []
    data = tokenize_pairs(_dsdict(rows), tok, max_len=128, canvas="released", dataset="folder", log=logs.append)
    x = data["train"][0]
    assert x["src_ids"] == [tok.cls_token_id] + tok(PAIRS[0][0], add_special_tokens=False)["input_ids"]
    assert "prompt none" in logs[-1]


def test_pad_to_from_the_run_config(tok, tiny_pairs, private_hf_cache):
    def batch_of(**flags):
        cfg = TrainConfig(task="seq2seq", dataset="folder", data_files=tiny_pairs, max_len=128, **flags)
        cfg.check()
        data, collate = load_task_data(cfg, tok, ("train",), **QUIET)
        rows = [data["train"][i] for i in range(6)]
        return cfg, rows, collate(rows)

    cfg, _, b = batch_of()  # absorbing: auto = max_len, the width of the decoder's canvas
    assert (cfg.pad_to, cfg.truncation, cfg.canvas) == ("max_len", "ours", "ours")
    assert b["input_ids"].shape == (6, 128)
    cfg, rows, b = batch_of(pad_to="longest")
    lens = [len(r["src_ids"]) + len(r["trg_ids"]) for r in rows]
    assert b["input_ids"].shape == (6, max(lens)) and max(lens) < 128
    for i, r in enumerate(rows):  # the released target_mask: zeros over the source, ones to the end of the row
        ns = len(r["src_ids"])
        assert b["noise_mask"][i].tolist() == [False] * ns + [True] * (max(lens) - ns)
        assert b["input_ids"][i, lens[i]:].eq(tok.pad_token_id).all()
    cfg, _, b = batch_of(process="gaussian")  # DiffuSeq keeps its fixed canvas and its truncation
    assert (cfg.pad_to, cfg.truncation) == ("max_len", "diffuseq") and b["input_ids"].shape == (6, 128)


# --- DiffuSeq's truncation -----------------------------------------------------------------------------------

def letters(n: int, start: int = 0) -> str:
    return " ".join(chr(ord("a") + (start + i) % 26) for i in range(n))


def test_diffuseq_truncation_is_merge_and_mask_on_every_small_pair():
    for seq_len in (6, 7, 12, 16):
        for ns in range(0, 16):
            for nt in range(0, 16):
                s, t = list(range(1000, 1000 + ns)), list(range(2000, 2000 + nt))
                want_s, want_t = released_merge_and_mask([101, *s, 102], [101, *t, 102], seq_len)
                for canvas in ("ours", "released"):
                    got = fit_pair(s, t, seq_len, canvas, "diffuseq")
                    assert got == (want_s, want_t, len(want_s) < ns, len(want_t) < nt), (seq_len, ns, nt)


def test_diffuseq_truncation_in_tokenize_pairs(tok):
    sizes = [(3, 3), (20, 3), (3, 20), (20, 20), (9, 8), (6, 7)]
    rows = [{"src": letters(s), "trg": letters(t, start=13)} for s, t in sizes]
    logs = []
    out = tokenize_pairs(_dsdict(rows), tok, max_len=16, truncation="diffuseq", log=logs.append)["train"]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    for i, r in enumerate(rows):
        want_s, want_t = released_merge_and_mask(tok(r["src"])["input_ids"], tok(r["trg"])["input_ids"], 16)
        assert out[i]["src_ids"] == [cls, *want_s, sep] and out[i]["trg_ids"] == [*want_t, sep], i
    assert "DiffuSeq's rule" in logs[0] and "source cut in 4" in logs[0] and "target cut in 4" in logs[0]  # (9, 8), (6, 7): both sides


def test_cache_tells_the_layouts_apart(tok):
    ds = _dsdict([{"src": "a b", "trg": "c d"}])

    def fp(**kw):
        return tokenize_pairs(ds, tok, max_len=32, dataset="qqp", **kw, **QUIET)["train"]._fingerprint

    prints = {fp(), fp(canvas="released"), fp(truncation="diffuseq"), fp(canvas="released", truncation="diffuseq")}
    assert len(prints) == 4
    assert fp(canvas="released") != tokenize_pairs(ds, tok, max_len=32, dataset="quasar_t", canvas="released",
                                                   **QUIET)["train"]._fingerprint


# --- flags -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--canvas", "diffusionbert"), ("--pad_to", "shortest"),
                                        ("--truncation", "left")])
def test_unknown_canvas_modes_stop_argparse(tmp_path, flag, value):
    proc = run_here("train.py", "--task", "seq2seq", flag, value, "--out_dir", str(tmp_path / "run"), cwd=str(tmp_path))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and f"error: argument {flag}: invalid choice: '{value}'" in last
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,needles", [
    (("--task", "seq2seq", "--process", "gaussian", "--canvas", "released"), ("--canvas released", "absorbing")),
    (("--task", "seq2seq", "--process", "gaussian", "--pad_to", "longest"), ("--pad_to longest",)),
    (("--canvas", "released"), ("--canvas", "seq2seq flags")),
    (("--truncation", "ours"), ("--truncation", "seq2seq flags")),
])
def test_impossible_canvas_flags_are_one_error_line(tmp_path, flags, needles):
    proc = run_here("train.py", *flags, "--dataset", "bible", "--out_dir", str(tmp_path / "run"), cwd=str(tmp_path))
    one_error_line(proc, *needles)
    assert not (tmp_path / "run").exists()


def test_old_seq2seq_configs_read_as_they_were_trained():
    from runtime.config import from_dict
    old = from_dict({"task": "seq2seq", "process": "absorbing"})
    assert (old.canvas, old.pad_to, old.truncation) == ("ours", "max_len", "ours")
    assert from_dict({"task": "lm"}).pad_to == "auto"


# --- end to end: training and decoding on the released canvas ----------------------------------------------

@pytest.mark.slow
def test_released_canvas_trains_and_decodes_with_its_prompt(tmp_path, tiny_bert, tiny_pairs):
    run = tmp_path / "run"
    trained = run_here("train.py", "--task", "seq2seq", "--dataset", "qqp", "--data_files", tiny_pairs, "--canvas", "released", "--pad_to", "longest",
            "--model_name_or_path", tiny_bert, "--num_steps", "20", "--max_len", "64", "--batch_size", "4",
            "--max_steps", "2", "--eval_every", "2", "--eval_examples", "4", "--eval_steps", "2", "--lr", "1e-3",
            "--warmup_steps", "0", "--out_dir", str(run), "--log_dir", str(tmp_path / "logs"), cwd=str(tmp_path))
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "prompt '\"' + src + '\" is equal to \"'" in trained.stdout + trained.stderr
    with open(run / "checkpoints" / "best" / "run_config.json", encoding="utf-8") as f:
        stored = json.load(f)["config"]
    assert (stored["canvas"], stored["pad_to"], stored["truncation"]) == ("released", "longest", "ours")
    out = tmp_path / "gen"
    decoded = run_here("predict_downstream_condition.py", "--checkpoint", str(run), "--num_examples", "2", "--steps",
                       "4", "--out_dir", str(out), "--name", "d", "--device", "cpu", cwd=str(tmp_path))
    assert decoded.returncode == 0, decoded.stderr[-2000:]
    with open(out / "d" / "seed42.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(tiny_pairs, "test.jsonl"), encoding="utf-8") as f:
        srcs = [json.loads(line)["src"] for line in f][:2]
    from transformers import AutoTokenizer

    from evaluation.seq2seq import decode_like_diffuseq
    from runtime.api import load
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    want = [[tok.cls_token_id] + tok(released_add_prompt("qqp", s), add_special_tokens=False)["input_ids"]
            for s in srcs]  # the prompted source, with no [SEP] after it
    assert [r["source"] for r in rows] == [decode_like_diffuseq(tok, w) for w in want]
    m = load(str(run), device="cpu")
    assert m.source_ids(srcs) == want
    assert len(m.decode(srcs, steps=2)) == 2


def test_bench_seq2seq_padding_quick(tmp_path, tiny_bert):
    """bench.py --seq2seq_padding end to end at a tiny shape: the same batches on the --seq_len canvas and at
    their longest row (QQP-like pairs of about 26 tokens), and the ratio of the two steps."""
    out = tmp_path / "pad.json"
    proc = run_here("bench.py", "--seq2seq_padding", "--quick", "--model", tiny_bert, "--batch_size", "4",
                    "--seq_len", "96", "--pairs", "16", "--batches", "2", "--num_steps", "50", "--json", str(out),
                    cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.load(open(out))
    assert r["before"]["mean_width"] == 96 and r["after"]["mean_width"] <= r["max_pair_tokens"] < 96
    assert r["speedup"] == r["before"]["step_s"] / r["after"]["step_s"]
    assert "step before / after" in proc.stdout
    bad = run_here("bench.py", "--seq2seq_padding", "--process", "gaussian", cwd=str(tmp_path))
    one_error_line(bad, "--seq2seq_padding")


# --- how a generated target is read -----------------------------------------------------------------------

class SaysCanvas:
    """A denoiser certain of one canvas ``plan`` (token ids by position): absorbing, one-hot logits at the masked
    positions; gaussian, the plan's embeddings, which clamping turns back into the plan's tokens."""

    time_agnostic = True

    def __init__(self, net, plan: list[int]):
        self.net, self.plan = net, torch.tensor(plan)
        self.embed, self.embedding_weight = getattr(net, "embed", None), getattr(net, "embedding_weight", None)

    def __call__(self, x, t, attention_mask=None, positions=None):
        if positions is None:  # gaussian: z_t [B, L, D]
            return self.net.embedding_weight[self.plan[:x.shape[1]]].detach().expand_as(x)
        want = self.plan[:x.shape[1]].expand(x.shape[0], -1)[positions]
        logits = torch.full((want.numel(), self.net.vocab_size if hasattr(self.net, "vocab_size") else 30522), -1e4)
        logits[torch.arange(want.numel()), want] = 0.0
        return logits


@pytest.mark.parametrize("process, expected", [
    # DiffusionBERT's decoder cuts each candidate at its first end token (predict_downstream_condition.py)
    ("absorbing", "and god [SEP]"),
    # DiffuSeq's decode_token drops only the trailing [PAD]s: words after a [SEP] stay (its metrics count them)
    ("gaussian", "and god [SEP] the lord [SEP]"),
])
def test_words_generated_after_the_target_end(tok, process, expected):
    from tests.test_infill import MAX_LEN, build
    m = build(tok, process, task="seq2seq")
    src = m.source_ids(["in"])[0]
    assert tok.convert_ids_to_tokens(src) == ["[CLS]", "in", "[SEP]"]
    tail = tok.convert_tokens_to_ids(["and", "god", "[SEP]", "the", "lord", "[SEP]"])
    plan = src + tail + [tok.pad_token_id] * (MAX_LEN - len(src) - len(tail))
    m.run.denoiser = SaysCanvas(m.run.denoiser, plan)
    options = {"steps": 4} if process == "absorbing" else {"respacing": "uniform_4"}
    assert m.decode(["in"], **options) == [expected]
