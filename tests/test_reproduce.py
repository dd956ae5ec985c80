"""reproduce.py's command line: bad flags stop at once with one error line, before any work."""
import os

from conftest import run_here


def test_bad_flags_give_one_error_line(tmp_path):
    for args, words in ((["--parts", "lm,bogus"], "--parts"), (["--jobs", "0"], "--jobs")):
        out = tmp_path / "r"
        p = run_here("reproduce.py", "--scale", "smoke", "--out", str(out), *args, cwd=str(tmp_path))
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]
        assert not os.path.exists(out)  # nothing written
