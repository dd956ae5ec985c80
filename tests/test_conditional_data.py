"""Tests for conditional_data: DiffuSeq-format validation, loading, tokenisation and the pair canvas."""
from __future__ import annotations

import json

import pytest
import torch

from conditional_data import (SPLITS, PairCollator, extract_target, load_pair_splits, tokenize_pairs,
                              validate_jsonl)
from common.errors import UserError
from textdata.lines import SKIP_HINT


# each test gets its own datasets cache (conftest.private_hf_cache): no result comes from an earlier
# run's arrow files, and the cleaned copies of --skip_bad_lines live there too
pytestmark = pytest.mark.usefixtures("private_hf_cache")


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write(path, data: str | bytes):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def pairs(n: int, tag: str):
    return [{"src": f"{tag} source {i}", "trg": f"{tag} target {i}"} for i in range(n)]


def make_folder(root, counts: dict[str, int]):
    root.mkdir(parents=True, exist_ok=True)
    for name, n in counts.items():
        write(root / f"{name}.jsonl", jsonl(pairs(n, name)))
    return root


# --- validate_jsonl -----------------------------------------------------------

GOOD = '{"src": "a b", "trg": "c"}\n'


def test_validate_counts_good_lines_with_crlf_bom_and_extra_fields(tmp_path):
    p = write(tmp_path / "ok.jsonl", b"\xef\xbb\xbf" + b'{"src": "x", "trg": "y", "id": 3}\r\n'
              + GOOD.encode() + b'{"src": "caf\xc3\xa9", "trg": "z"}')  # no final newline
    assert validate_jsonl(str(p)) == 3


BAD_CASES = [
    # (file text, line the error must name, fragment of the message)
    (GOOD + GOOD + '{"src": "a", "trg": }\n' + GOOD, 3, "malformed JSON ("),
    (GOOD + '{"src": "a", "trg": "b"\n', 2, "malformed JSON ("),
    (GOOD + '{"src": "a", "trg": NaN}\n', 2, "malformed JSON ("),
    (GOOD + '{"trg": "b"}\n', 2, 'missing "src"'),
    (GOOD + GOOD + GOOD + '{"src": "a"}\n', 4, 'missing "trg"'),
    (GOOD + '{"src": "a", "trg": "   "}\n', 2, 'empty "trg"'),
    (GOOD + '{"src": "", "trg": "b"}\n', 2, 'empty "src"'),
    (GOOD + '{"src": 5, "trg": "b"}\n', 2, '"src" is a number, not a string'),
    (GOOD + '{"src": "a", "trg": null}\n', 2, '"trg" is null, not a string'),
    (GOOD + "\n" + GOOD, 2, "blank line"),
    (GOOD + GOOD + "   \t\n", 3, "blank line"),
    (GOOD + GOOD + "\n", 3, "blank line"),  # a trailing empty line counts too
    (GOOD + '["a", "b"]\n', 2, "expected a JSON object"),
    (GOOD + GOOD + '"just a string"\n', 3, "got a string"),
]


@pytest.mark.parametrize("text,line,fragment", BAD_CASES)
def test_validate_names_file_and_line(tmp_path, text, line, fragment):
    p = write(tmp_path / "bad.jsonl", text)
    with pytest.raises(UserError) as e:
        validate_jsonl(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert fragment in msg, msg
    assert "\n" not in msg


def test_validate_non_utf8(tmp_path):
    p = write(tmp_path / "latin1.jsonl", GOOD.encode() + GOOD.encode() + b'{"src": "caf\xe9", "trg": "b"}\n')
    with pytest.raises(UserError) as e:
        validate_jsonl(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: ") and "UTF-8" in msg and "0xe9" in msg and "\n" not in msg


def test_validate_empty_file_and_missing_file(tmp_path):
    p = write(tmp_path / "empty.jsonl", b"")
    with pytest.raises(UserError, match="empty") as e:
        validate_jsonl(str(p))
    assert str(p) in str(e.value)
    with pytest.raises(UserError) as e:
        validate_jsonl(str(tmp_path / "nope.jsonl"))
    assert str(tmp_path / "nope.jsonl") in str(e.value)


def test_validate_not_strict_skips_blank_lines_and_accepts_empty_fields(tmp_path):
    p = write(tmp_path / "loose.jsonl", GOOD + "\n" + '{"src": "a", "trg": ""}\n' + "\n")
    assert validate_jsonl(str(p), strict=False) == 2
    with pytest.raises(UserError, match="blank line"):
        validate_jsonl(str(p))
    only_blank = write(tmp_path / "blank.jsonl", "\n\n")
    with pytest.raises(UserError, match="no examples"):
        validate_jsonl(str(only_blank), strict=False)
    # structural errors stay errors when not strict
    with pytest.raises(UserError, match="missing"):
        validate_jsonl(str(write(tmp_path / "m.jsonl", '{"src": "a"}\n')), strict=False)


# --- load_pair_splits ---------------------------------------------------------


def test_folder_loads_with_counts_and_only_src_trg(tmp_path):
    root = make_folder(tmp_path / "qqp", {"train": 7, "valid": 3, "test": 2})
    # an extra field of mixed type must not survive (nor break the load)
    write(root / "test.jsonl", jsonl([{"src": "s0", "trg": "t0", "id": 1}, {"src": "s1", "trg": "t1", "id": "x"}]))
    logs = []
    ds = load_pair_splits("qqp", str(root), log=logs.append)
    assert list(ds) == list(SPLITS)
    assert {s: len(ds[s]) for s in SPLITS} == {"train": 7, "valid": 3, "test": 2}
    for s in SPLITS:
        assert ds[s].column_names == ["src", "trg"]
    assert ds["train"][4] == {"src": "train source 4", "trg": "train target 4"}
    assert ds["test"]["trg"][:] == ["t0", "t1"]
    assert any("train: 7 pairs" in line for line in logs), logs


def test_only_requested_splits_are_needed(tmp_path):
    root = make_folder(tmp_path / "d", {"test": 4})
    ds = load_pair_splits("folder", str(root), splits=("test",), log=lambda *_: None)
    assert list(ds) == ["test"] and len(ds["test"]) == 4
    with pytest.raises(UserError, match="unknown split"):
        load_pair_splits("folder", str(root), splits=("dev",), log=lambda *_: None)


def test_missing_folder_and_missing_split_name_the_path(tmp_path):
    missing = tmp_path / "not_there"
    with pytest.raises(UserError) as e:
        load_pair_splits("qqp", str(missing), log=lambda *_: None)
    assert str(missing) in str(e.value)
    with pytest.raises(UserError, match="needs a data folder"):
        load_pair_splits("qqp", None, log=lambda *_: None)
    root = make_folder(tmp_path / "partial", {"train": 3, "valid": 2})
    with pytest.raises(UserError) as e:
        load_pair_splits("qqp", str(root), log=lambda *_: None)
    assert str(root / "test.jsonl") in str(e.value)
    root2 = make_folder(tmp_path / "novalid", {"train": 3, "test": 2})
    with pytest.raises(UserError) as e:
        load_pair_splits("qqp", str(root2), log=lambda *_: None)
    assert str(root2 / "valid.jsonl") in str(e.value) and "dev.jsonl" in str(e.value)


def test_dev_jsonl_stands_in_for_valid(tmp_path):
    root = make_folder(tmp_path / "d", {"train": 3, "dev": 5, "test": 2})
    ds = load_pair_splits("wiki_auto", str(root), log=lambda *_: None)
    assert len(ds["valid"]) == 5
    assert ds["valid"][0] == {"src": "dev source 0", "trg": "dev target 0"}
    # valid.jsonl wins when both exist
    write(root / "valid.jsonl", jsonl(pairs(1, "valid")))
    assert load_pair_splits("wiki_auto", str(root), log=lambda *_: None)["valid"]["src"][:] == ["valid source 0"]


def test_bad_line_is_reported_before_datasets_reads_the_file(tmp_path):
    root = make_folder(tmp_path / "d", {"train": 3, "valid": 2, "test": 2})
    write(root / "valid.jsonl", GOOD + '{"src": "a", "trg": ""}\n')
    with pytest.raises(UserError) as e:
        load_pair_splits("qqp", str(root), log=lambda *_: None)
    assert str(e.value) == f'{root / "valid.jsonl"}:2: empty "trg"; {SKIP_HINT}'


def test_bible_task_loads(tmp_path):
    ds = load_pair_splits("bible", corpus_dir=str(tmp_path), log=lambda *_: None)
    assert (tmp_path / "bible_pairs" / "train.jsonl").is_file()
    n = {s: len(ds[s]) for s in SPLITS}
    assert 27_000 < n["train"] < 30_000, n
    assert n["valid"] > 500 and n["test"] > 500, n
    assert ds["train"].column_names == ["src", "trg"]
    first = ds["train"][0]  # Genesis 1:1, KJV -> WEB
    assert first["src"] == "In the beginning God created the heaven and the earth."
    assert first["trg"] == "In the beginning God created the heavens and the earth."


# --- tokenize_pairs -----------------------------------------------------------


def _dsdict(rows):
    from datasets import Dataset, DatasetDict
    return DatasetDict(train=Dataset.from_list(rows))


def letters(n: int, start: int = 0) -> str:
    # single letters are one wordpiece each in the uncased BERT vocabulary
    return " ".join(chr(ord("a") + (start + i) % 26) for i in range(n))


def test_tokenize_layout(tok):
    rows = [{"src": "How do I learn Python?", "trg": "What is the best way to learn Python?"},
            {"src": "Hi.", "trg": "Hello there, friend."}]
    out = tokenize_pairs(_dsdict(rows), tok, max_len=64, log=lambda *_: None)["train"]
    assert out["src"][:] == [r["src"] for r in rows] and out["trg"][:] == [r["trg"] for r in rows]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    for r, x, y in zip(rows, out["src_ids"], out["trg_ids"]):
        assert x[0] == cls and x[-1] == sep and x.count(sep) == 1 and x.count(cls) == 1
        assert y[-1] == sep and y.count(sep) == 1 and cls not in y
        assert x[1:-1] == tok(r["src"], add_special_tokens=False)["input_ids"]
        assert y[:-1] == tok(r["trg"], add_special_tokens=False)["input_ids"]
    assert out["src_cut"][:] == [False, False] and out["trg_cut"][:] == [False, False]


def test_tokenize_truncation_rule(tok):
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert tok(letters(30), add_special_tokens=False)["input_ids"].__len__() == 30
    max_len = 16  # the source is cut just enough to fit, but never below 8 tokens: [CLS] + 6 + [SEP]
    cases = [  # (src words, trg words) -> (src content kept, trg content kept, src cut, trg cut)
        ((3, 3), (3, 3, False, False)),
        ((6, 7), (6, 7, False, False)),      # 8 + 8 = 16: fits exactly
        ((7, 6), (7, 6, False, False)),      # 9 + 7 = 16: fits, so the long source is not cut
        ((7, 7), (6, 7, True, False)),       # 9 + 8 = 17: source cut to 8, target then fits
        ((20, 3), (10, 3, True, False)),     # target 4 tokens: source cut to 12, not to 8
        ((3, 20), (3, 10, False, True)),     # target gets 16 - 5 = 11 tokens
        ((20, 20), (6, 7, True, True)),
    ]
    rows = [{"src": letters(s), "trg": letters(t, start=13)} for (s, t), _ in cases]
    logs = []
    out = tokenize_pairs(_dsdict(rows), tok, max_len=max_len, log=logs.append)["train"]
    for i, ((s, t), (ks, kt, cs, ct)) in enumerate(cases):
        x, y = out[i]["src_ids"], out[i]["trg_ids"]
        full_x = tok(rows[i]["src"], add_special_tokens=False)["input_ids"]
        full_y = tok(rows[i]["trg"], add_special_tokens=False)["input_ids"]
        assert x == [cls] + full_x[:ks] + [sep], (i, x)
        assert y == full_y[:kt] + [sep], (i, y)
        assert len(x) + len(y) <= max_len
        assert (out[i]["src_cut"], out[i]["trg_cut"]) == (cs, ct), i
    assert logs == ["data: train: 7 pairs; source cut in 3 (never below 8 tokens), target cut in 2 (max_len 16)"]


def test_tokenize_max_len_minimum(tok):
    rows = [{"src": letters(10), "trg": letters(10)}]
    with pytest.raises(UserError, match="max_len"):
        tokenize_pairs(_dsdict(rows), tok, max_len=5, log=lambda *_: None)
    out = tokenize_pairs(_dsdict(rows), tok, max_len=6, log=lambda *_: None)["train"][0]
    assert len(out["src_ids"]) == 3 and len(out["trg_ids"]) == 3  # [CLS] x [SEP] y y [SEP]
    out = tokenize_pairs(_dsdict(rows), tok, max_len=7, log=lambda *_: None)["train"][0]
    assert len(out["src_ids"]) == 3 and len(out["trg_ids"]) == 4  # max_len // 2 rounds down


def test_tokenize_cache_key(tok):
    import copy
    ds = _dsdict([{"src": "a b", "trg": "c d"}])

    def fp(t, m):
        return tokenize_pairs(ds, t, max_len=m, log=lambda *_: None)["train"]._fingerprint

    assert fp(tok, 32) == fp(tok, 32)
    assert fp(tok, 32) != fp(tok, 33)
    tok2 = copy.deepcopy(tok)
    tok2.add_tokens(["qqzzxx"])
    assert fp(tok2, 32) != fp(tok, 32)


# --- PairCollator -------------------------------------------------------------


def _check_canvas(batch, rows, pad_id, L):
    B = len(rows)
    assert batch["input_ids"].shape == (B, L) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].shape == (B, L) and bool((batch["attention_mask"] == 1).all())
    assert batch["noise_mask"].shape == (B, L) and batch["noise_mask"].dtype == torch.bool
    for i, r in enumerate(rows):
        ns, nt = len(r["src_ids"]), len(r["trg_ids"])
        assert int(batch["src_len"][i]) == ns and int(batch["trg_len"][i]) == nt
        ids, noise = batch["input_ids"][i].tolist(), batch["noise_mask"][i].tolist()
        assert ids[:ns] == list(r["src_ids"])
        assert ids[ns:ns + nt] == list(r["trg_ids"])
        assert ids[ns + nt:] == [pad_id] * (L - ns - nt)
        assert noise == [j >= ns for j in range(L)]  # exactly the target region, never the source


def test_collator_fixed_canvas():
    pad = 7  # an unusual id, so padding with 0 or with anything else would show
    rows = [{"src_ids": [101, 11, 12, 102], "trg_ids": [21, 22, 102]},
            {"src_ids": [101, 11, 102], "trg_ids": [21, 22, 23, 24, 25, 102]},
            {"src_ids": [101, 11, 12, 13, 14, 102], "trg_ids": [102]}]
    batch = PairCollator(pad_id=pad, canvas_len=12)(rows)
    _check_canvas(batch, rows, pad, 12)
    assert batch["src_len"].tolist() == [4, 3, 6] and batch["trg_len"].tolist() == [3, 6, 1]
    with pytest.raises(UserError, match="does not fit"):
        PairCollator(pad_id=pad, canvas_len=8)(rows)


def test_collator_batch_length():
    rows = [{"src_ids": [101, 11, 102], "trg_ids": [21, 102]},
            {"src_ids": [101, 11, 12, 13, 102], "trg_ids": [21, 22, 102]}]
    batch = PairCollator(pad_id=0)(rows)
    _check_canvas(batch, rows, 0, 8)
    assert batch["input_ids"][0].tolist() == [101, 11, 102, 21, 102, 0, 0, 0]


def test_collator_on_tokenized_rows(tok):
    rows = [{"src": letters(n), "trg": letters(m, start=5)} for n, m in ((3, 9), (12, 2), (30, 30))]
    data = tokenize_pairs(_dsdict(rows), tok, max_len=24, log=lambda *_: None)["train"]
    batch_rows = [data[i] for i in range(len(data))]
    batch = PairCollator(tok.pad_token_id, canvas_len=24)(batch_rows)
    _check_canvas(batch, batch_rows, tok.pad_token_id, 24)
    ids, noise = batch["input_ids"], batch["noise_mask"]
    assert not noise[ids == tok.cls_token_id].any()
    assert bool((ids[~noise] != tok.pad_token_id).all())  # no padding in the source region
    for i in range(len(rows)):
        target = extract_target(ids[i], int(batch["src_len"][i]), tok.sep_token_id, tok.pad_token_id)
        assert target == batch_rows[i]["trg_ids"][:-1]


# --- extract_target -----------------------------------------------------------

SEP, PAD, CLS, MASK = 102, 0, 101, 103


@pytest.mark.parametrize("ids,src_len,special,expected", [
    ([CLS, 5, 6, SEP, 7, 8, SEP, PAD, PAD], 4, (), [7, 8]),       # the source's [SEP] is not the end
    ([CLS, 5, SEP, 7, 8, PAD, 9, SEP], 3, (), [7, 8]),            # [PAD] ends the target too
    ([CLS, 5, SEP, 7, MASK, 8, SEP, 9], 3, (MASK, CLS), [7, 8]),  # other specials dropped
    ([CLS, 5, SEP, 7, CLS, 8, SEP], 3, (), [7, CLS, 8]),          # ... only those named
    ([CLS, 5, SEP, SEP, 7, 8], 3, (), []),
    ([CLS, 5, SEP, 7, 8, 9], 3, (), [7, 8, 9]),                   # no end marker: up to the end
])
def test_extract_target(ids, src_len, special, expected):
    assert extract_target(ids, src_len, SEP, PAD, special) == expected
    assert extract_target(torch.tensor(ids), src_len, SEP, PAD, special) == expected


def test_extract_target_rejects_a_batch():
    with pytest.raises(ValueError):
        extract_target(torch.zeros(2, 5, dtype=torch.long), 1, SEP, PAD)
