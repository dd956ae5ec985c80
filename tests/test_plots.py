"""evaluation/plots.py writes valid PNGs that follow their data: line plots, a run's training plots (as
train.py leaves them, and when drawing fails), and compute_metric.py --mode compare --plot."""
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from conftest import ROOT, run_here, train_args
from evaluation import plots
from evaluation.plots import line_plot, read_metrics


def _png_size(path):
    """(width, height) from the IHDR chunk, after checking the signature and the chunk's CRC."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + length]
    assert struct.unpack(">I", data[16 + length:20 + length])[0] == zlib.crc32(kind + body)
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", body[:8])


def test_line_plot_is_a_png_that_changes_with_the_data(tmp_path):
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    series = [{"label": "x", "x": [1, 2, 4], "y": [3.0, 2.0, 1.5]}]
    line_plot(a, series, "t", "steps", "nats", hlines=[{"label": "truth", "y": 1.0}], logx=True)
    assert _png_size(a) == (int(6.4 * 110), int(4.2 * 110))
    line_plot(b, [{"label": "x", "x": [1, 2, 4], "y": [3.0, 2.5, 1.5]}], "t", "steps", "nats",
              hlines=[{"label": "truth", "y": 1.0}], logx=True)
    assert open(a, "rb").read() != open(b, "rb").read()


def test_read_metrics_picks_the_split_and_key(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "split": "train", "loss": 5.0}, {"step": 2, "split": "dev", "nelbo_per_token": 3.0},
            {"step": 4, "split": "dev", "nelbo_per_token": 2.5}, {"step": 6, "split": "dev", "other": 1.0}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(str(p), "dev", "nelbo_per_token") == ([2, 4], [3.0, 2.5])


def test_non_finite_points_are_left_out(tmp_path):
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    line_plot(a, [{"label": "x", "x": [1, 2, 4, 8], "y": [3.0, float("nan"), 1.5, float("inf")]}], "t", "s", "n",
              logx=True)
    line_plot(b, [{"label": "x", "x": [1, 4], "y": [3.0, 1.5]}], "t", "s", "n", logx=True)
    assert open(a, "rb").read() == open(b, "rb").read()  # the same picture as without those points
    c = str(tmp_path / "c.png")  # nothing finite at all: still a picture, with the reference line
    line_plot(c, [{"label": "x", "x": [1, 2], "y": [float("nan")] * 2}], "t", "s", "n",
              hlines=[{"label": "truth", "y": 1.0}], logx=True)
    assert _png_size(c) == (int(6.4 * 110), int(4.2 * 110))


# ---- a run's training plots (train.py draws them at every evaluation)

PNG_W, PNG_H1, PNG_H2 = int(6.4 * 110), int(4.2 * 110), int(7.0 * 110)  # one panel; two stacked panels


def _write_log(path, rows, mode="w"):
    with open(path, mode, encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def _read_back(path):
    """(width, height) of the PNG as matplotlib reads it back, after the byte-level checks."""
    import matplotlib.image
    w, h = _png_size(path)
    assert matplotlib.image.imread(path).shape[:2] == (h, w)
    return w, h


def _absorbing_log(steps):
    rows = []
    for s in steps:
        rows.append({"step": s, "split": "train", "loss": 6.0 / s, "nelbo_per_token": 5.0 / s, "lr": 1e-3})
        if s % 2 == 0:
            rows.append({"step": s, "split": "dev", "nelbo_per_token": 4.0 / s, "ppl_token": 2.718 ** (4.0 / s),
                         "ppl_word": 2.718 ** (5.0 / s)})
    return rows


def test_training_plots_follow_the_log_and_repeat_byte_for_byte(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write_log(run / "metrics.jsonl", _absorbing_log(range(1, 7)))
    written = plots.draw_training_plots(str(run))
    loss, dev = run / "plots" / "train_loss.png", run / "plots" / "dev.png"
    assert sorted(written) == sorted([str(loss), str(dev)])
    assert _read_back(loss) == (PNG_W, PNG_H1) and _read_back(dev) == (PNG_W, PNG_H2)  # NELBO, then PPL
    first = loss.read_bytes(), dev.read_bytes()
    plots.draw_training_plots(str(run))  # the same log: the same bytes (no date or version in the PNG)
    assert (loss.read_bytes(), dev.read_bytes()) == first
    _write_log(run / "metrics.jsonl", [{"step": 8, "split": "dev", "nelbo_per_token": 0.4, "ppl_token": 1.5,
                                        "ppl_word": 1.7}], mode="a")
    plots.draw_training_plots(str(run))
    assert loss.read_bytes() == first[0] and dev.read_bytes() != first[1]  # only the dev figure moved
    assert not [f for f in os.listdir(run / "plots") if f.endswith(".tmp")]


def test_the_dev_figure_is_the_objectives(tmp_path):
    """Gaussian runs log a dev loss (one panel); before the first evaluation there is no dev figure."""
    run = tmp_path / "g"
    run.mkdir()
    _write_log(run / "metrics.jsonl", [{"step": 1, "split": "train", "loss": 3.0, "mse": 1.0}])
    assert plots.draw_training_plots(str(run)) == [str(run / "plots" / "train_loss.png")]
    _write_log(run / "metrics.jsonl", [{"step": 2, "split": "dev", "loss": 2.5, "mse": 0.9}], mode="a")
    plots.draw_training_plots(str(run))
    assert _read_back(run / "plots" / "dev.png") == (PNG_W, PNG_H1)


def test_a_long_loss_curve_gets_its_running_mean(tmp_path, monkeypatch):
    nan, inf = float("nan"), float("inf")
    # by hand: the finite values among the last 2 (a skipped step's loss is non-finite)
    assert plots._running_mean([1.0, nan, 3.0, 5.0, inf, 7.0], 2) == [1.0, 1.0, 3.0, 4.0, 5.0, 7.0]
    assert math.isnan(plots._running_mean([nan, nan, 1.0], 2)[1])
    drawn = []
    monkeypatch.setattr(plots, "line_plot", lambda path, series, *a, **k: drawn.append(series) or path)
    run = tmp_path / "run"
    run.mkdir()
    _write_log(run / "metrics.jsonl", [{"step": s, "split": "train", "loss": float(s % 2)} for s in range(1, 20)])
    plots.draw_training_plots(str(run))
    _write_log(run / "metrics.jsonl", [{"step": 20, "split": "train", "loss": 0.0}], mode="a")  # the 20th record
    plots.draw_training_plots(str(run))
    assert [len(d) for d in drawn] == [1, 2]
    mean = drawn[1][1]
    assert mean["label"] == "mean of the last 5 records" and mean["x"] == list(range(1, 21))
    assert mean["y"][:2] == [1.0, 0.5] and mean["y"][4:] == [0.6, 0.4] * 8


def test_read_log_keeps_what_a_resumed_run_redid(tmp_path):
    """A run killed while logging step 6 resumes from its checkpoint at step 2: its records replace the
    earlier ones from the step it logs again on, of every split. Its first record landed on the line the
    crash cut short, which is skipped, so the old step 3 stays."""
    p = tmp_path / "metrics.jsonl"
    _write_log(p, _absorbing_log(range(1, 6)))
    with open(p, "a", encoding="utf-8") as f:
        f.write('{"time": 1.0, "step": 6, "spl')  # no newline
    _write_log(p, [{"step": 3, "split": "train", "loss": 9.0}, {"step": 4, "split": "train", "loss": 8.0},
                   {"step": 4, "split": "dev", "nelbo_per_token": 7.0}, {"step": 5, "split": "train", "loss": 7.5}],
               mode="a")
    assert read_metrics(str(p), "train", "loss") == ([1, 2, 3, 4, 5], [6.0, 3.0, 2.0, 8.0, 7.5])
    assert read_metrics(str(p), "dev", "nelbo_per_token") == ([2, 4], [2.0, 7.0])


def test_matplotlib_is_imported_only_to_draw():
    code = "import sys, evaluation.plots; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=ROOT))


# ---- train.py and compute_metric.py


@pytest.mark.slow
def test_train_leaves_plots_of_its_whole_log(lm_run, tmp_path):
    _, _, run, proc = lm_run
    assert sorted(os.listdir(run / "plots")) == ["dev.png", "train_loss.png"]
    assert "could not draw" not in proc.stdout and f"plots in {run / 'plots'}" in proc.stdout
    copy = tmp_path / "run"  # the same name: the same title
    copy.mkdir()
    shutil.copy(run / "metrics.jsonl", copy / "metrics.jsonl")
    plots.draw_training_plots(str(copy))
    for name in ("train_loss.png", "dev.png"):  # drawn at the end from every record
        assert (copy / "plots" / name).read_bytes() == (run / "plots" / name).read_bytes()


@pytest.mark.slow
def test_a_failing_draw_is_one_warning_and_training_goes_on(lm_word_freq, tiny_bert, tiny_corpus, tmp_path,
                                                            monkeypatch):
    _, wf = lm_word_freq

    def broken(run_dir):
        raise RuntimeError("no backend\nat all")

    monkeypatch.setattr(plots, "draw_training_plots", broken)
    out = tmp_path / "r"
    p = run_here(*train_args(tiny_bert, tiny_corpus, wf, out, max_steps=2, extra=("--eval_every", "1")),
                 cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    warnings = [line for line in p.stdout.splitlines() if "could not draw" in line]
    # the evaluations at steps 1 and 2 (the last); one line each, the message kept
    assert warnings == [f"warning: could not draw {out / 'plots'} (RuntimeError: no backend at all); "
                        "training goes on"] * 2
    assert "done: 2 steps" in p.stdout and (out / "checkpoints" / "last" / "model.safetensors").is_file()
    assert not (out / "plots").exists()


@pytest.mark.slow
def test_a_resumed_run_draws_its_whole_log(lm_word_freq, tiny_bert, tiny_corpus, tmp_path):
    """Stopped after step 2 and resumed to step 4, a run leaves the plots of the uninterrupted run, byte for
    byte (same losses on the CPU, same run name in the titles)."""
    _, wf = lm_word_freq
    part, full = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for out, steps, extra in ((part, 2, ()), (part, 4, ("--resume", str(part))), (full, 4, ())):
        p = run_here(*train_args(tiny_bert, tiny_corpus, wf, out, max_steps=steps, extra=extra), cwd=str(tmp_path))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert read_metrics(str(part / "metrics.jsonl"), "dev", "ppl_token")[0] == [2, 4]
    for name in ("train_loss.png", "dev.png"):
        assert (part / "plots" / name).read_bytes() == (full / "plots" / name).read_bytes(), name


def _generation_folder(path, checkpoint, respacing, calls, recovers):
    """A folder as predict_downstream_condition.py writes it: seed*.jsonl and decode.json."""
    path.mkdir()
    refs = ["the lord is my shepherd", "in the beginning was the word", "let there be light"]
    for seed, rec in zip((1, 2), recovers):
        _write_log(path / f"seed{seed}.jsonl", [{"recover": r, "reference": f, "source": "[CLS] x [SEP]"}
                                                for r, f in zip(rec, refs)])
    timings = [{"seed": s, "wall_seconds": 1.0, "network_calls": calls, "row_evaluations": calls * len(refs)}
               for s in (1, 2)]
    (path / "decode.json").write_text(json.dumps({"checkpoint": checkpoint, "process": "gaussian",
                                                  "decode_respacing": respacing, "num_sources": len(refs),
                                                  "timings": timings}))


def test_compare_plot(tmp_path):
    good = ["the lord is my shepherd", "in the beginning was the word", "let there be light"]
    poor = ["the lord is a shepherd", "in the beginning", "light"]
    dirs = []
    for run, spec, calls, rec in (("base", "full", 100, [good, good]), ("base", "uniform_10", 10, [poor, good]),
                                  ("base", "adp_10", 10, [good, poor]), ("post", "uniform_10", 10, [good, good])):
        d = tmp_path / f"{run}-{spec}"
        _generation_folder(d, f"outputs/{run}/checkpoints/best", None if spec == "full" else spec, calls, rec)
        dirs.append(str(d))
    png, out = tmp_path / "cmp.png", tmp_path / "cmp.json"
    p = run_here("compute_metric.py", "--mode", "compare", "--samples", *dirs, "--bertscore_model", "none",
                 "--out", str(out), "--plot", str(png), cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert f"wrote {png}" in p.stdout and _read_back(png) == (PNG_W, PNG_H2)  # BLEU and exact match
    rows = json.load(open(out))["metrics"]["rows"]
    # a line per checkpoint and kind of step grid: the full chain is a uniform grid
    assert [plots._decoding_group(r) for r in rows] == ["base uniform", "base uniform", "base adp", "post uniform"]
    p = run_here("compute_metric.py", "--mode", "compare", "--samples", *dirs, "--bertscore_model", "none",
                 "--out", str(out), "--plot", str(png), "--plot_metrics", "bleu", "--overwrite", cwd=str(tmp_path))
    assert p.returncode == 0 and _read_back(png) == (PNG_W, PNG_H1)
    p = run_here("compute_metric.py", "--mode", "compare", "--samples", *dirs, "--bertscore_model", "none",
                 "--out", str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.png"), "--plot_metrics", "blue",
                 cwd=str(tmp_path))
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --plot_metrics: blue")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.png").exists()


def test_frontier_plot_draws_a_line_per_sampler_sorted_by_calls(tmp_path):
    rows = [{"line": "ours", "calls": 64, "forbidden_fraction": 0.3, "bigram_tv": 0.2},
            {"line": "ours", "calls": 8, "forbidden_fraction": 0.8, "bigram_tv": 0.5},
            {"line": "AR top-p 0.9", "calls": 20, "forbidden_fraction": 0.01, "bigram_tv": 0.12},
            {"line": "ours", "calls": 16, "forbidden_fraction": 0.6, "bigram_tv": None}]  # left out of TV only
    forbidden, tv = plots.frontier_series(rows, ["forbidden_fraction", "bigram_tv"])
    assert forbidden == [{"label": "ours", "x": [8.0, 16.0, 64.0], "y": [0.8, 0.6, 0.3]},
                         {"label": "AR top-p 0.9", "x": [20.0], "y": [0.01]}]
    assert tv[0] == {"label": "ours", "x": [8.0, 64.0], "y": [0.5, 0.2]}
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    plots.frontier_plot(a, rows, ["forbidden_fraction", "bigram_tv"], "t",
                        hlines={"bigram_tv": [{"label": "held-out", "y": 0.1}]})
    assert _read_back(a) == (int(9.6 * 110), int(7.4 * 110))
    plots.frontier_plot(b, rows[:3], ["forbidden_fraction", "bigram_tv"], "t",
                        hlines={"bigram_tv": [{"label": "held-out", "y": 0.1}]})
    assert open(a, "rb").read() != open(b, "rb").read()  # the picture follows the data
