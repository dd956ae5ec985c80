"""Bad input data: every case is one clear error naming FILE:LINE, or (``--skip_bad_lines``) a counted,
logged skip; a long line is a counted truncation. Seq2seq JSONL (conditional_data.pairs) and LM text
(textdata.lm), then once through the real train.py."""
from __future__ import annotations

import json
import os
import re

import pytest

from conditional_data import load_pair_splits, tokenize_pairs
from runtime.config import TrainConfig, build_parser, from_dict
from common.errors import UserError
from textdata import lm
from textdata.lines import SHOW, SKIP_HINT

LONG = 100_000  # characters in "a 100k-character line"


# each test gets its own datasets cache (conftest.private_hf_cache): no result comes from an earlier
# run's arrow files, and the cleaned copies of --skip_bad_lines live there too
pytestmark = pytest.mark.usefixtures("private_hf_cache")


def good(i: int, tag: str = "train") -> bytes:
    return (json.dumps({"src": f"{tag} source {i}", "trg": f"{tag} target {i}"}) + "\n").encode()


def folder(root, train: bytes, n_other: int = 3):
    """A DiffuSeq folder whose train.jsonl is ``train`` and whose valid/test files are good."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_bytes(train)
    for s in ("valid", "test"):
        (root / f"{s}.jsonl").write_bytes(b"".join(good(i, s) for i in range(n_other)))
    return root


# (bad line, reason the message must give); each goes in as line 3 of a file of good lines
BAD_PAIR_LINES = [
    (b'{"src": "a", "trg": }\n', "malformed JSON (Expecting value at column 21)"),
    (b'{"src": "a", "trg": "b"\n', "malformed JSON (Expecting ',' delimiter at column 24)"),
    (b'{"trg": "b"}\n', 'missing "src"'),
    (b'{"src": "a"}\n', 'missing "trg"'),
    (b'{"x": 1}\n', 'missing "src" and "trg"'),
    (b'{"src": "", "trg": "b"}\n', 'empty "src"'),
    (b'{"src": "a", "trg": " \\t "}\n', 'empty "trg"'),
    (b'{"src": ["a"], "trg": "b"}\n', '"src" is an array, not a string'),
    (b'["a", "b"]\n', 'expected a JSON object with "src" and "trg", got an array'),
    (b"\n", "blank line (expected one JSON object per line)"),
    (b'{"src": "caf\xe9", "trg": "b"}\n', "not valid UTF-8 (byte 0xe9 at byte 13 of the line)"),
    (b'{"src": "' + b"w" * LONG + b'\n', "malformed JSON (Unterminated string starting at column 9)"),
]


# --- seq2seq JSONL: strict (the default) --------------------------------------


@pytest.mark.parametrize("line,reason", BAD_PAIR_LINES)
def test_strict_bad_pair_line_is_one_error_naming_file_line_and_the_flag(tmp_path, line, reason):
    root = folder(tmp_path / "d", good(0) + good(1) + line + good(2))
    with pytest.raises(UserError) as e:
        load_pair_splits("folder", str(root), log=lambda *_: None)
    assert str(e.value) == f"{root / 'train.jsonl'}:3: {reason}; {SKIP_HINT}"
    assert "--skip_bad_lines" in SKIP_HINT


def test_empty_file_and_missing_split_are_errors_in_both_modes(tmp_path):
    root = folder(tmp_path / "d", b"")
    for skip in (False, True):
        with pytest.raises(UserError, match=re.escape(f"{root / 'train.jsonl'} is empty")):
            load_pair_splits("folder", str(root), log=lambda *_: None, skip_bad_lines=skip)
    (root / "train.jsonl").write_bytes(good(0))
    os.remove(root / "test.jsonl")
    for skip in (False, True):
        with pytest.raises(UserError, match=re.escape(f"{root / 'test.jsonl'} (test split) does not exist")):
            load_pair_splits("folder", str(root), log=lambda *_: None, skip_bad_lines=skip)


# --- seq2seq JSONL: --skip_bad_lines -------------------------------------------


def test_skip_drops_every_kind_of_bad_line_and_logs_one_count_per_file(tmp_path):
    lines, good_rows = [], []
    for k, (bad, _) in enumerate(BAD_PAIR_LINES):  # good, bad, good, bad, ...
        lines += [good(k), bad]
        good_rows.append({"src": f"train source {k}", "trg": f"train target {k}"})
    lines.append(good(99))
    good_rows.append({"src": "train source 99", "trg": "train target 99"})
    data = b"".join(lines)
    root = folder(tmp_path / "d", data)
    train = root / "train.jsonl"
    logs = []
    ds = load_pair_splits("folder", str(root), log=logs.append, skip_bad_lines=True)
    assert ds["train"].to_list() == good_rows
    assert len(ds["valid"]) == len(ds["test"]) == 3
    skipped = [m for m in logs if m.startswith("data: skipped")]
    assert len(skipped) == 1, logs  # the clean valid/test files log no skip
    n_bad, n = len(BAD_PAIR_LINES), len(lines)
    first = "; ".join(f"{train}:{2 * k + 2}: {BAD_PAIR_LINES[k][1]}" for k in range(SHOW))
    assert skipped[0].startswith(f"data: skipped {n_bad} bad lines of {n} in {train} (first: {first}; "
                                 f"{n_bad - SHOW} more); reading the other {n - n_bad} from the cleaned copy "), skipped
    # the user's file is untouched; the copy is in the datasets cache and a second load reuses it
    assert train.read_bytes() == data
    copy = skipped[0].rsplit(" ", 1)[1]
    assert copy.startswith(str(tmp_path / "hf_cache")) and os.path.isfile(copy)
    mtime = os.path.getmtime(copy)
    logs2 = []
    again = load_pair_splits("folder", str(root), log=logs2.append, skip_bad_lines=True)
    assert again["train"].to_list() == good_rows and os.path.getmtime(copy) == mtime
    assert [m for m in logs2 if m.startswith("data: skipped")] == skipped


def test_skip_with_only_bad_lines_is_an_error_and_a_clean_file_is_read_as_is(tmp_path):
    root = folder(tmp_path / "d", b"\n" + b'{"src": "a"}\n')
    with pytest.raises(UserError) as e:
        load_pair_splits("folder", str(root), log=lambda *_: None, skip_bad_lines=True)
    train = root / "train.jsonl"
    assert str(e.value) == (f"{train}: all 2 lines are bad, nothing is left to read "
                            f"(first: {train}:1: blank line (expected one JSON object per line))")
    train.write_bytes(good(0) + good(1))
    logs = []
    ds = load_pair_splits("folder", str(root), log=logs.append, skip_bad_lines=True)
    assert len(ds["train"]) == 2 and not any("skipped" in m for m in logs), logs
    assert not os.path.exists(tmp_path / "hf_cache" / "cleaned_data_files")


def test_long_pair_is_cut_and_counted(tmp_path, tok):
    long = (json.dumps({"src": "word " * (LONG // 5), "trg": "more " * (LONG // 5)}) + "\n").encode()
    root = folder(tmp_path / "d", good(0) + long + good(1))
    ds = load_pair_splits("folder", str(root), splits=("train",), log=lambda *_: None)
    logs = []
    out = tokenize_pairs(ds, tok, 32, log=logs.append)["train"]
    assert "data: train: 3 pairs; source cut in 1 (never below 16 tokens), target cut in 1 (max_len 32)" in logs
    assert len(out[1]["src_ids"]) + len(out[1]["trg_ids"]) == 32


# --- LM plain text (--dataset text --data_files) ------------------------------


def text_folder(root, train: bytes, valid: bytes = b"a valid line\nanother one\n"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_bytes(train)
    (root / "valid.txt").write_bytes(valid)
    (root / "test.txt").write_bytes(b"a test line\n")
    return root


def test_text_non_utf8_is_an_error_naming_file_and_line(tmp_path):
    root = text_folder(tmp_path / "t", b"first line\nsecond line\n", valid=b"ok\nbad caf\xe9 line\nok again\n")
    with pytest.raises(UserError) as e:
        lm.load_text_splits("text", str(root), log=lambda *_: None)
    assert str(e.value) == (f"{root / 'valid.txt'}:2: not valid UTF-8 (byte 0xe9 at byte 8 of the line); "
                            f"{SKIP_HINT}")


def test_text_non_utf8_lines_are_skipped_and_counted(tmp_path):
    train = b"one\n\xff\xfe two\nthree\nfour \xc3\n"
    root = text_folder(tmp_path / "t", train)
    logs = []
    ds = lm.load_text_splits("text", str(root), log=logs.append, skip_bad_lines=True)
    assert ds["train"]["text"][:] == ["one", "three"]
    assert ds["valid"]["text"][:] == ["a valid line", "another one"]
    skipped = [m for m in logs if m.startswith("data: skipped")]
    f = root / "train.txt"
    assert len(skipped) == 1 and skipped[0].startswith(
        f"data: skipped 2 bad lines of 4 in {f} (first: {f}:2: not valid UTF-8 (byte 0xff at byte 1 of the line); "
        f"{f}:4: not valid UTF-8 (byte 0xc3 at byte 6 of the line)); reading the other 2 from the cleaned copy "), logs
    assert f.read_bytes() == train


@pytest.mark.parametrize("skip", [False, True])
def test_text_empty_or_blank_file_and_missing_train_are_errors(tmp_path, skip):
    root = text_folder(tmp_path / "t", b"")
    with pytest.raises(UserError, match=re.escape(f"data file {root / 'train.txt'} (train split) is empty")):
        lm.load_text_splits("text", str(root), log=lambda *_: None, skip_bad_lines=skip)
    (root / "train.txt").write_bytes(b"\n  \n\t\r\n\n")
    with pytest.raises(UserError, match=re.escape(f"data file {root / 'train.txt'} (train split) has only blank")):
        lm.load_text_splits("text", str(root), log=lambda *_: None, skip_bad_lines=skip)
    os.remove(root / "train.txt")
    with pytest.raises(UserError, match=re.escape(f"folder {root} has no train.txt")):
        lm.load_text_splits("text", str(root), log=lambda *_: None, skip_bad_lines=skip)


def test_text_blank_lines_are_dropped_and_a_long_line_is_cut_both_counted(tmp_path, tok):
    root = text_folder(tmp_path / "t", b"one two\n\n" + b"word " * (LONG // 5) + b"\n   \nthree\n")
    ds = lm.load_text_splits("text", str(root), log=lambda *_: None)
    logs = []
    out = lm.tokenize_splits(ds, tok, 16, log=logs.append)
    assert "data: train: dropped 2 empty lines" in logs
    assert "data: train: 1 of 3 lines longer than --max_len 16 were truncated" in logs
    assert out["train"]["length"][:] == [4, 16, 3] and out["train"]["truncated"][:] == [False, True, False]


def test_text_missing_valid_split_is_carved_and_logged(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    (root / "train.txt").write_text("".join(f"line {i}\n" for i in range(10)))
    logs = []
    ds = lm.load_text_splits("text", str(root), log=logs.append)
    assert (len(ds["train"]), len(ds["valid"]), len(ds["test"])) == (8, 1, 1)
    assert f"data: carved a valid split of 1 lines off {root / 'train.txt'} (seeded, deterministic)" in logs


# --- the flag ------------------------------------------------------------------


def test_flag_is_off_by_default_and_old_configs_load_without_it():
    assert build_parser().parse_args([]).skip_bad_lines is False
    assert build_parser().parse_args(["--skip_bad_lines"]).skip_bad_lines is True
    old = {k: v for k, v in vars(build_parser().parse_args(["--max_len", "40"])).items() if k != "skip_bad_lines"}
    cfg = from_dict(old)
    assert cfg.skip_bad_lines is False and cfg.max_len == 40 and isinstance(cfg, TrainConfig)


# --- end to end ------------------------------------------------------------------


@pytest.mark.slow
def test_train_cli_skips_bad_lines_with_the_flag_and_stops_without_it(tmp_path):
    from conftest import run_cli, run_together

    lines = [good(i) for i in range(12)]
    lines[4:4] = [b'{"src": "a", "trg": }\n', b"\xff\n"]
    root = folder(tmp_path / "bad_pairs", b"".join(lines), n_other=12)
    # the smallest model: a DiffuSeq transformer of 0.3M parameters (the MiniLM vocabulary)
    args = ["train.py", "--task", "seq2seq", "--dataset", "folder", "--data_files", str(root), "--process",
            "gaussian", "--hidden_size", "16", "--num_layers", "1", "--num_heads", "2", "--emb_dim", "8",
            "--num_steps", "8", "--max_len", "24", "--batch_size", "4",
            "--max_steps", "2", "--eval_every", "2", "--eval_examples", "4", "--eval_steps", "2",
            "--warmup_steps", "0", "--log_every", "1", "--log_dir", str(tmp_path / "logs")]
    strict, ok = run_together(  # the two runs side by side: the test takes the time of one
        lambda: run_cli(*args, "--out_dir", str(tmp_path / "strict"), cwd=str(tmp_path), check=False),
        lambda: run_cli(*args, "--skip_bad_lines", "--out_dir", str(tmp_path / "run"), cwd=str(tmp_path)))
    train = root / "train.jsonl"
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    errors = [ln for ln in strict.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {train}:5: malformed JSON (Expecting value at column 21); {SKIP_HINT}"], strict.stderr

    assert (f"data: skipped 2 bad lines of 14 in {train} (first: {train}:5: malformed JSON (Expecting value at "
            f"column 21); {train}:6: not valid UTF-8 (byte 0xff at byte 1 of the line)); reading the other 12") \
        in ok.stdout, ok.stdout
    assert "data: folder: 12 train / 12 valid lines" in ok.stdout
    with open(tmp_path / "run" / "checkpoints" / "last" / "run_config.json") as f:
        info = json.load(f)
    assert info["step"] == 2 and info["config"]["skip_bad_lines"] is True
