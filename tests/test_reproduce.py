"""reproduce.py and reproduction/: bad flags stop at once with one error line; the results page is rendered
from results.json alone (a stored record's rows, checked by hand); a part registered as data runs, is
stored under its key and appears on the page."""
import json
import math
import os
import shutil

from conftest import ROOT, one_error_line, run_here

FULL = os.path.join(ROOT, "docs", "reproduce-full", "results.json")


def test_bad_flags_give_one_error_line(tmp_path):
    out = tmp_path / "r"
    run = ["--scale", "smoke", "--out", str(out)]
    for args, words in (([*run, "--parts", "lm,bogus"], "--parts"), ([*run, "--jobs", "0"], "--jobs"),
                        (["--render", str(out)], "results.json"), (["--render", str(tmp_path), *run], "--render")):
        one_error_line(run_here("reproduce.py", *args, cwd=str(tmp_path)), words)
        assert not os.path.exists(out)  # nothing written


def test_render_reproduces_the_stored_full_run(tmp_path):
    """--render on docs/reproduce-full/results.json: rows whose numbers were read from the json by hand."""
    shutil.copy(FULL, tmp_path / "results.json")
    p = run_here("reproduce.py", "--render", str(tmp_path), cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    page = (tmp_path / "results.md").read_text(encoding="utf-8")
    # glm.infill.absorbing: given_kept 1.0, slot_accuracy 0.7598253, fill_nll_per_token 1.6551497,
    # fill_forbidden_fraction 0.1666667, flags "--steps 512"
    assert "| absorbing | --steps 512 | 100.0% | 0.760 | 1.6551 | 16.7% |" in page
    # seq2seq.rows["diffuseq-more-adp_4"]: exact_match 0.99, token_accuracy 0.99944, bleu 0.99817,
    # calls_per_sequence 4.0, wall_seconds 1.23; pairs 300
    assert "| diffuseq-more-adp_4 | 300 | 0.990 | 0.999 | 0.9982 | 4 | 1.2 |" in page
    # Tang et al.'s post-training against its control at adp_4: 289/300 against 297/300 exact, the binomial
    # standard error of the difference (written out here), and "lower" beyond twice it
    px, py = 289 / 300, 297 / 300
    se = math.sqrt(px * (1 - px) / 300 + py * (1 - py) / 300)
    assert f"{px - py:+.3f} ± {se:.3f}, lower" == "-0.027 ± 0.012, lower"
    assert ("post-training helps at adp_4 beyond the same extra training without the penalty: **does not hold** "
            "(diffuseq-post-adp_4 0.963 vs diffuseq-more-adp_4 0.990: -0.027 ± 0.012, lower)") in page
    for png in ("sample_quality.png", "seq2seq_steps.png"):  # redrawn from the json
        assert (tmp_path / "plots" / png).stat().st_size > 0


def toy_part(key: str, title: str, needs: tuple = ()):
    """A part that runs no script: it reports its settings, and what the parts it needs reported."""
    from reproduction.spec import Part

    def render(results, sc, ctx):
        seen = [ctx.results[k]["value"] for k in needs]
        return [f"| {key} | {results['value']} | {sc[key + '_grid']} | {seen} |", ""]
    return Part(key=key, title=title, settings={"smoke": {key + "_grid": [1, 2, 3]}}, needs=needs,
                run=lambda runner, paths, sc: {"value": sum(sc[key + "_grid"]) * 2}, render=render)


def test_a_registered_part_runs_and_is_rendered(tmp_path, monkeypatch):
    from reproduction import parts
    monkeypatch.setattr(parts, "PARTS", [*parts.PARTS, toy_part("toy", "9. A toy part"),
                                         toy_part("toy2", "10. Another", needs=("toy",))])
    out = tmp_path / "r"
    # toy2 needs toy, whose results are not there yet: both run
    p = run_here("reproduce.py", "--scale", "smoke", "--parts", "toy2", "--out", str(out), cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "settings.json").read_text())["toy2_grid"] == [1, 2, 3]
    doc = json.loads((out / "results.json").read_text())
    assert doc["toy"] == doc["toy2"] == {"value": 12} and "lm" not in doc
    # toy again in the same folder: toy2's results stay on the page, after toy's, by the registry's order
    p = run_here("reproduce.py", "--scale", "smoke", "--parts", "toy", "--out", str(out), cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    expected = ("## 9. A toy part\n\n| toy | 12 | [1, 2, 3] | [] |\n\n"
                "## 10. Another\n\n| toy2 | 12 | [1, 2, 3] | [12] |\n")
    assert expected in (out / "results.md").read_text(encoding="utf-8")
    (out / "results.md").unlink()
    assert run_here("reproduce.py", "--render", str(out), cwd=str(tmp_path)).returncode == 0
    assert expected in (out / "results.md").read_text(encoding="utf-8")
    # a setting changed under an existing folder is refused
    parts.PARTS[-2].settings["smoke"]["toy_grid"] = [4]
    one_error_line(run_here("reproduce.py", "--scale", "smoke", "--parts", "toy", "--out", str(out),
                            cwd=str(tmp_path)), "other settings")
