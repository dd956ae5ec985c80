"""The inputs of tests/test_bad_flags.py, built in-process in a second or two (no training): tiny checkpoints
written with ``runtime.checkpoint.save`` from a tiny BERT, one with a NaN weight, a file where a folder is
expected, malformed JSON lines. ``python tests/bad_flag_inputs.py ROOT OUT`` runs the table as subprocesses
against the repository at ROOT and prints each row's exit status and last stderr line (how the before/after
table of issue 24 was made)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

NAN_TENSOR = "bert.encoder.layer.0.attention.self.query.weight"  # where make_inputs puts a NaN


def save_checkpoint(ckpt_dir: str, tiny_bert: str, **cfg_kw) -> str:
    """An untrained checkpoint of a tiny-BERT absorbing run (``cfg_kw`` are TrainConfig fields), laid out as
    train.py writes one."""
    from runtime import checkpoint
    from runtime.assemble import initial_network
    from runtime.config import TrainConfig
    from textdata import lm
    cfg = TrainConfig(**{"model_name_or_path": tiny_bert, "dataset": "bible", "schedule": "mutual", "max_len": 32,
                         **cfg_kw})
    cfg.check()
    denoiser, tok, path, hf_config = initial_network(cfg, log=lambda *a, **k: None)
    derived = {"vocab_size": hf_config.vocab_size, "mask_id": tok.mask_token_id, "pad_id": tok.pad_token_id,
               "vocab_fingerprint": lm.vocab_fingerprint(tok), "model_path": path,
               "length_counts": [0, 0, 0, 1, 2, 3, 2, 1] + [0] * (cfg.max_len - 9),
               "word_freq": None, "post_trained_from": None, "schedule": None}
    checkpoint.save(ckpt_dir, run_config={"config": dataclasses.asdict(cfg), "derived": derived, "step": 0},
                    model=denoiser, hf_config=hf_config, tokenizer=tok)
    return ckpt_dir


def with_nan(src: str, dst: str, name: str = NAN_TENSOR) -> str:
    """A copy of the checkpoint ``src`` whose tensor ``name`` holds one NaN."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    state = load_file(path)
    state[name][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    return dst


def make_inputs(root: str, tiny_bert: str, tiny_corpus: str, tiny_pairs: str) -> dict:
    """Everything the table's placeholders name, under ``root``."""
    os.makedirs(root, exist_ok=True)
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    ckpt = save_checkpoint(j("run", "checkpoints", "best"), tiny_bert, num_steps=16, eval_steps=4)
    ckpt_mdlm = save_checkpoint(j("mdlm", "checkpoints", "best"), tiny_bert, num_steps=16, eval_steps=4,
                                objective="mdlm", schedule="loglinear")
    ckpt_ar = save_checkpoint(j("ar", "checkpoints", "best"), tiny_bert, process="autoregressive", schedule="auto")
    with open(j("a_file"), "w") as f:
        f.write("not a folder\n")
    with open(j("bad.jsonl"), "w") as f:
        f.write('{"recover": "a", "reference": "b", "source": "c"}\n{"recover": \n')
    with open(j("good.jsonl"), "w") as f:
        f.write("".join(json.dumps({"recover": f"r {i}", "reference": f"r {i}", "source": f"s {i}"}) + "\n"
                        for i in range(3)))
    with open(j("samples.txt"), "w") as f:
        f.write("a sample\nanother sample\n")
    return {"root": root, "run": j("run"), "bert": tiny_bert, "corpus": tiny_corpus, "pairs": tiny_pairs, "ckpt": ckpt,
            "ckpt_mdlm": ckpt_mdlm, "ckpt_ar": ckpt_ar,
            "nan": with_nan(ckpt, j("nan_ckpt")), "file": j("a_file"), "missing": j("no_such_thing"),
            "bad_jsonl": j("bad.jsonl"), "good_jsonl": j("good.jsonl"), "samples": j("samples.txt"),
            "out": j("out")}


def _run_all(repo: str, out: str) -> None:  # pragma: no cover - a tool, not a test
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.conftest import cli_env
    from tests.test_bad_flags import ROWS, TRAIN, expand, _fixtures_for_tool
    paths = _fixtures_for_tool(out)

    def one(row):
        rid, script, args, _ = row
        cmd = [sys.executable, os.path.join(repo, script), *expand(args, paths, rid)]
        p = subprocess.run(cmd, cwd=out, env=cli_env(out, {"PYTHONPATH": repo}), capture_output=True, text=True,
                           timeout=600)
        err = p.stderr.strip().splitlines()
        tb = "Traceback" in p.stderr
        last = err[-1] if err else ""
        return f"| {rid} | {p.returncode} | {'traceback: ' if tb else ''}{last[:160]} |"

    with ThreadPoolExecutor(2) as pool:
        for line in pool.map(one, ROWS):
            print(line, flush=True)


if __name__ == "__main__":  # pragma: no cover
    import sys
    _run_all(sys.argv[1], sys.argv[2])
