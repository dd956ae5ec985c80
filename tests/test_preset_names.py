"""A preset name that does not exist: run.sh and run_condition.sh stop with one error line naming the presets
they have, exit status 2, and start nothing (no outputs/ folder)."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ROOT, one_error_line


@pytest.mark.parametrize("script,preset", [("run.sh", "lm1b-releasd"), ("run.sh", "qqp"),
                                           ("run_condition.sh", "qpq"), ("run_condition.sh", "lm1b")])
def test_an_unknown_preset_is_one_error_line(tmp_path, script, preset):
    before = set(os.listdir(ROOT))
    p = subprocess.run(["bash", os.path.join(ROOT, script), preset, "--max_steps", "1"], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHON="false"))
    one_error_line(p, f"unknown preset '{preset}'", "demo")
    assert p.stdout == "" and set(os.listdir(ROOT)) == before and not os.listdir(tmp_path)
