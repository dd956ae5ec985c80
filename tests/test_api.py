"""runtime.api against the scripts it serves, on the tiny checkpoints of conftest. The oracle is each script's
output file, its command line run in this process (runpy): ``load(...).sample`` gives predict.py's lines and
``decode`` the ``recover`` fields of predict_downstream_condition.py (absorbing and gaussian), for the same seed
and batch size. Then the refusals (the wrong task, steps above T, bad sources) and what the seed does."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_here
from common.errors import UserError
from runtime.api import load

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

LM_LINES = dict(num_samples=6, steps=16, batch_size=4, seed=7, top_p=0.9)
LM_RELEASED = dict(num_samples=5, steps=16, batch_size=4, seed=3, sampler="released", topk=30, temperature=0.1,
                   length=6)


def flags(**kw) -> list[str]:
    return [a for k, v in kw.items() for a in (f"--{k}", str(v))]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def short_pairs(tmp_path_factory, tok):
    """A DiffuSeq test split of verse pairs that fit the 48-token canvas uncut, so that each source string is
    the very source the decoder put on its canvas (the tiny_pairs test split has cut sources)."""
    from textdata.bible import load_verse_pairs
    pairs, _ = load_verse_pairs()
    # + 5: uncut by DiffuSeq's rule too (the gaussian default: the words fit max_len - 5)
    fits = [p for p in pairs[400:] if len(tok.tokenize(p.kjv)) + len(tok.tokenize(p.web)) + 5 <= 48][:9]
    path = tmp_path_factory.mktemp("short_pairs")
    (path / "test.jsonl").write_text("".join(json.dumps({"src": p.kjv, "trg": p.web}) + "\n" for p in fits),
                                     encoding="utf-8")
    return path, [p.kjv for p in fits]


def with_test_split(run, folder, dest):
    """A copy of the run's best checkpoint whose run config reads its data from ``folder`` (weights, tokenizer
    and every other setting as trained): the decoder then decodes that folder's test split."""
    from runtime.checkpoint import RUN_CONFIG
    shutil.copytree(run / "checkpoints" / "best", dest)
    info = json.loads((dest / RUN_CONFIG).read_text())
    info["config"]["data_files"] = str(folder)
    (dest / RUN_CONFIG).write_text(json.dumps(info))
    return dest


@pytest.fixture(scope="module")
def oracles(tmp_path_factory, lm_run, seq2seq_run, gauss_run, short_pairs):
    """The scripts' output files, each script run in this process (its command line through runpy, on this
    module's one thread, as the API calls run) in a folder of its own (datasets cache)."""
    out = tmp_path_factory.mktemp("oracles")
    folder, _ = short_pairs
    absorbing = with_test_split(seq2seq_run[1], folder, out / "absorbing_ckpt")
    gaussian = with_test_split(gauss_run[1], folder, out / "gaussian_ckpt")
    for d in ("lm", "ab", "ga"):
        (out / d).mkdir()
    lm = ("predict.py", "--checkpoint", str(lm_run[2]), "--out_dir", str(out / "gen"))
    for args, cwd in (((*lm, *flags(**LM_LINES), "--name", "ours"), "lm"),
                      ((*lm, *flags(**LM_RELEASED), "--name", "released"), "lm"),
                      (("predict_downstream_condition.py", "--checkpoint", str(absorbing), "--steps", "10",
                        "--mbr_size", "2", "--batch_size", "4", "--seed", "5", "--name", "ab", "--out_dir",
                        str(out / "gen")), "ab"),
                      (("predict_downstream_condition.py", "--checkpoint", str(gaussian), "--decode_respacing",
                        "adp_10", "--batch_size", "4", "--name", "ga", "--out_dir", str(out / "gen")), "ga")):
        p = run_here(*args, cwd=str(out / cwd))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return out / "gen"


@pytest.fixture(scope="module")
def lm_model(lm_run):
    return load(str(lm_run[2]))  # a run directory: its best checkpoint, as the scripts take it


@pytest.fixture(scope="module")
def absorbing_model(seq2seq_run):
    return load(str(seq2seq_run[1] / "checkpoints" / "best"))


@pytest.fixture(scope="module")
def gaussian_model(gauss_run):
    return load(str(gauss_run[1] / "checkpoints" / "best"))


# ---------------------------------------------------------------- the API's strings are the scripts'

def test_sample_gives_predict_py_lines(oracles, lm_model):
    for name, kw in (("ours", LM_LINES), ("released", LM_RELEASED)):
        kw = dict(kw)
        texts = lm_model.sample(kw.pop("num_samples"), **kw)
        assert "".join(t + "\n" for t in texts) == (oracles / f"{name}.txt").read_text(encoding="utf-8"), name


def test_decode_gives_the_decoder_recovers_absorbing(oracles, short_pairs, absorbing_model):
    from evaluation.seq2seq import decode_like_diffuseq
    _, sources = short_pairs
    seeds = {seed: read_jsonl(oracles / "ab" / f"seed{seed}.jsonl") for seed in (5, 6)}
    # the API's canvas holds the decoder's source, token for token
    assert ([decode_like_diffuseq(absorbing_model.tokenizer, x) for x in absorbing_model.source_ids(sources)]
            == [r["source"] for r in seeds[5]])
    for seed, rows in seeds.items():
        assert absorbing_model.decode(sources, steps=10, seed=seed, batch_size=4) == [r["recover"] for r in rows]
    assert [r["recover"] for r in seeds[5]] != [r["recover"] for r in seeds[6]]  # the seeds do differ


def test_decode_gives_the_decoder_recovers_gaussian(oracles, short_pairs, gaussian_model):
    _, sources = short_pairs
    rows = read_jsonl(oracles / "ga" / "seed42.jsonl")
    assert gaussian_model.decode(sources, respacing="adp_10", batch_size=4) == [r["recover"] for r in rows]
    assert json.load(open(oracles / "ga" / "decode.json"))["timesteps"] == \
        gaussian_model.decoding(respacing="adp_10").report["timesteps"]


# ---------------------------------------------------------------- seeds

def test_the_seed_decides_the_strings(lm_model, gaussian_model, short_pairs):
    _, sources = short_pairs
    a, b, c = (lm_model.sample(4, steps=8, seed=s) for s in (1, 1, 2))
    assert a == b and a != c
    a, b, c = (gaussian_model.decode(sources[:3], respacing="uniform_5", seed=s) for s in (1, 1, 2))
    assert a == b and a != c


# ---------------------------------------------------------------- refusals: one UserError line

@pytest.mark.parametrize("call, needles", [
    (lambda lm, ab, ga: ab.sample(2), ("seq2seq checkpoint", "decode()")),
    (lambda lm, ab, ga: ga.sample(2), ("seq2seq checkpoint", "decode()")),
    (lambda lm, ab, ga: lm.decode(["in the beginning"]), ("an lm checkpoint", "sample()")),
    (lambda lm, ab, ga: lm.sample(2, steps=65), ("steps 65 exceeds", "T=64")),
    (lambda lm, ab, ga: ab.decode(["in the beginning"], steps=51), ("steps 51 exceeds", "T=50")),
    (lambda lm, ab, ga: ga.decode(["in the beginning"], respacing="adp_500"), ("respacing: ", "T=100")),
    (lambda lm, ab, ga: ga.decode(["in the beginning"], steps=10), ("respacing='uniform_10'",)),
    (lambda lm, ab, ga: ga.decode(["in the beginning"], topk=5), ("absorbing-sampler",)),
    (lambda lm, ab, ga: ab.decode(["in the beginning"], respacing="adp_5"), ("respacing and weights", "steps")),
    (lambda lm, ab, ga: lm.sample(2, length=31, block_size=0), ("block_size must be between 1 and",)),
    (lambda lm, ab, ga: lm.sample(2, length=0), ("length must be at least 1",)),
    (lambda lm, ab, ga: lm.sample(0, steps=8), ("num_samples must be at least 1",)),
    (lambda lm, ab, ga: lm.sample(2, top_p=0), ("need topk >= 0, 0 < top_p <= 1",)),
    (lambda lm, ab, ga: lm.sample(2, sampler="greedy"), ("sampler must be one of ours, released",)),
    (lambda lm, ab, ga: ab.decode([], steps=10), ("sources is empty",)),
    (lambda lm, ab, ga: ab.decode(["in the beginning", "  "], steps=10), ("source 1 is empty",)),
    (lambda lm, ab, ga: ab.decode("in the beginning", steps=10), ("list of strings",)),
    (lambda lm, ab, ga: ga.decode(["in the beginning", "and god said " * 20]), ("source 1 is 62 tokens", "max_len=48")),
])
def test_bad_requests_are_one_user_error(call, needles, lm_model, absorbing_model, gaussian_model):
    with pytest.raises(UserError) as e:
        call(lm_model, absorbing_model, gaussian_model)
    message = str(e.value)
    assert "\n" not in message and "--" not in message, message  # keyword arguments, not the scripts' flags
    for n in needles:
        assert n in message, message


def test_raw_weights_only_for_gaussian(seq2seq_run, gauss_run, short_pairs):
    _, sources = short_pairs
    with pytest.raises(UserError, match="respacing and weights are for gaussian"):
        load(str(seq2seq_run[1]), weights="raw").decode(sources[:1])
    raw = load(str(gauss_run[1]), weights="raw")
    assert len(raw.decode(sources[:2], respacing="uniform_3")) == 2
    with pytest.raises(UserError, match="weights must be one of ema, raw"):
        load(str(gauss_run[1]), weights="last")


# ---------------------------------------------------------------- what a decoding says of itself

@pytest.mark.parametrize("process, flags, cache, summary, note", [
    ("absorbing", {}, True, "cache on", None),
    ("absorbing", {}, False, "cache off", None),  # asked for: nothing to say
    ("absorbing", {"time_conditioning": "layerwise"}, True, "cache off", "conditioned on t (layerwise); caching is off"),
    ("gaussian", {}, True, "5 steps", None),
])
def test_a_decoding_says_how_it_ran(tok, process, flags, cache, summary, note):
    from tests.test_infill import build
    m = build(tok, process, **flags)
    options = {"steps": 4, "cache": cache} if process == "absorbing" else {"respacing": "uniform_5"}
    d = m.decoding(**options)
    assert d.summary == summary
    assert any(note in n for n in d.notes) if note else d.notes == ()
