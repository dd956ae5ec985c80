"""evaluation/plots.py writes valid PNGs that follow their data."""
import json
import struct
import zlib

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
            {"step": 4, "split": "dev", "nelbo_per_token": 2.5}, {"step": 4, "split": "dev", "other": 1.0}]
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
