"""The CUDA paths in one call (``bash scripts/gpu_check.sh``): one table, a non-zero exit on any failure.

Rows:

* the tests marked ``cuda`` (tests/test_cuda.py): the same training step on the CPU and on CUDA in fp32,
  bf16 autocast, fused AdamW, ``--compile`` against eager, a checkpoint moving between the devices, and
  sampling that is byte-identical for a seed;
* train.py under ``torchrun --nproc_per_node 1`` on CUDA: a single-process NCCL group;
* bench.py at the bert-base shape (12 x 768, V 30522; batch 64, length 128) in bf16, for the absorbing and
  the Gaussian process: training steps/s, tokens/s, model FLOPs utilisation against the card's peak,
  sampling sequences/s, peak memory. The weights are a random BERT-base (the timing does not depend on
  them), so nothing is downloaded.

Without CUDA every row is reported as skipped and the exit status is 0. At most ``--budget`` seconds
(default 480): a step that would start after it is reported as not run, which counts as a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE, BATCH, LENGTH = "cuda", 64, 128  # the bench rows' device and shape (bert-base's pre-training shape)


def sh(cmd: list[str], out: str, name: str, timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Run ``cmd`` in the repository root, its output in ``out/name.log``; (exit status, seconds)."""
    start = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=max(timeout, 1),
                                env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.time() - start


def cuda_tests(out: str, timeout: float) -> list[tuple[str, str, str]]:
    """Rows of the tests marked ``cuda``, from pytest's junit XML."""
    xml = os.path.join(out, "cuda_tests.xml")
    rc, secs = sh([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={xml}"], out, "cuda_tests", timeout)
    if not os.path.isfile(xml):
        return [("tests marked cuda", "FAIL", f"pytest exited {rc} after {secs:.0f} s without a report (cuda_tests.log)")]
    rows = []
    for case in ET.parse(xml).iter("testcase"):
        name = case.get("name")
        if case.find("failure") is not None or case.find("error") is not None:
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            rows.append((name, "FAIL", (bad.get("message") or "").splitlines()[0][:100] if bad.get("message") else ""))
        elif case.find("skipped") is not None:
            rows.append((name, "skipped", case.find("skipped").get("message", "")[:100]))
        else:
            rows.append((name, "pass", f"{float(case.get('time', 0)):.1f} s"))
    if rc not in (0, 5) and all(r[1] != "FAIL" for r in rows):
        rows.append(("tests marked cuda", "FAIL", f"pytest exited {rc} (cuda_tests.log)"))
    return rows


def tiny_inputs(out: str) -> tuple[str, str, str]:
    """A tiny BERT (for its tokenizer), a folder of verse pairs, and a random BERT-base, written under ``out``."""
    import json as js

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from common.loading import resolve_model_path
    from textdata.bible import load_verse_pairs
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tiny, pairs, base = (os.path.join(out, n) for n in ("tiny_bert", "pairs", "bert_base_shape"))
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=128)).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    BertForMaskedLM(BertConfig(vocab_size=len(tok))).save_pretrained(base)  # BertConfig() is bert-base's shape
    tok.save_pretrained(base)
    os.makedirs(pairs, exist_ok=True)
    ps, _ = load_verse_pairs()
    for split, chunk in {"train": ps[:256], "valid": ps[300:332], "test": ps[400:416]}.items():
        with open(os.path.join(pairs, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.write("".join(js.dumps({"src": p.kjv, "trg": p.web}) + "\n" for p in chunk))
    return tiny, pairs, base


def nccl_row(out: str, tiny: str, pairs: str, timeout: float) -> tuple[str, str, str]:
    run = os.path.join(out, "nccl_run")
    rc, secs = sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
                   "--task", "seq2seq", "--process", "gaussian", "--dataset", "folder", "--data_files", pairs,
                   "--model_name_or_path", tiny, "--num_steps", "100", "--max_len", "48", "--emb_dim", "16",
                   "--hidden_size", "32", "--num_layers", "2", "--num_heads", "2", "--batch_size", "16",
                   "--max_steps", "6", "--eval_every", "3", "--eval_examples", "16", "--eval_steps", "10",
                   "--log_every", "1", "--device", DEVICE, "--out_dir", run, "--log_dir", run + "_logs"],
                  out, "nccl_train", timeout)
    ok = rc == 0 and os.path.isdir(os.path.join(run, "checkpoints", "last"))
    return ("train.py under torchrun --nproc_per_node 1 (NCCL)", "pass" if ok else "FAIL",
            f"{secs:.0f} s" if ok else f"exit {rc} (nccl_train.log)")


def bench_rows(out: str, base: str, process: str, timeout: float) -> list[tuple[str, str, str]]:
    """bench.py at batch 64, length 128, bf16: a training row and a sampling row."""
    js = os.path.join(out, f"bench_{process}.json")
    shape = (["--hidden_size", "768", "--num_layers", "12", "--num_heads", "12", "--emb_dim", "128"]
             if process == "gaussian" else ["--sample_steps", "32", "--lengths", "128", "--step_grid", "32"])
    rc, secs = sh([sys.executable, "bench.py", "--process", process, "--model", base, "--batch_size", str(BATCH),
                   "--seq_len", str(LENGTH), "--device", DEVICE, "--bf16", "--repeats", "3", *shape, "--json", js],
                  out, f"bench_{process}", timeout)
    if rc != 0 or not os.path.isfile(js):
        return [(f"bench.py {process}", "FAIL", f"exit {rc} after {secs:.0f} s (bench_{process}.log)")]
    t = json.load(open(js))["throughput"]
    mfu = f"MFU {100 * t['mfu']:.1f}% of {t['peak_tflops']:.0f} TFLOP/s" if t["mfu"] is not None else "MFU n/a"
    mem = f"{t['peak_memory_mb']:.0f} MB" if t["peak_memory_mb"] is not None else "n/a"
    return [(f"bench.py {process} training (bf16, {BATCH} x {LENGTH})", "pass",
             f"{t['train_steps_per_s']:.2f} steps/s, {t['train_tokens_per_s']:.0f} tokens/s, "
             f"{t['model_tflops']:.3g} TFLOP/s, {mfu}; peak {mem}"),
            (f"bench.py {process} sampling ({t['sample_setting']}, {BATCH} x {LENGTH})", "pass",
             f"{t['sample_sequences_per_s']:.1f} sequences/s")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="logs, JSON and the tiny inputs go here")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default: 480)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    deadline = time.time() + args.budget
    import torch
    has_cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if has_cuda else "no CUDA device"
    rows = cuda_tests(args.out, min(300.0, deadline - time.time()))
    later = [("train.py under torchrun --nproc_per_node 1 (NCCL)", "nccl"),
             ("bench.py absorbing (bert-base shape, bf16)", "absorbing"),
             ("bench.py gaussian (bert-base shape, bf16)", "gaussian")]
    if not has_cuda:
        rows += [(name, "skipped", "no CUDA device") for name, _ in later]
    else:
        tiny, pairs, base = tiny_inputs(args.out)
        for name, what in later:
            left = deadline - time.time()
            if left < 20:
                rows.append((name, "FAIL", "not run: the time budget is spent"))
            elif what == "nccl":
                rows.append(nccl_row(args.out, tiny, pairs, min(90.0, left)))
            else:
                rows += bench_rows(args.out, base, what, min(150.0, left))
    failed = sum(r[1] != "pass" and r[1] != "skipped" for r in rows)
    print(f"# gpu_check: {device}, torch {torch.__version__}, {time.time() - deadline + args.budget:.0f} s\n")
    print("| check | result | detail |\n|---|---|---|")
    for name, result, detail in rows:
        print(f"| {name} | {result} | {detail} |")
    print(f"\n{failed} failed, {sum(r[1] == 'pass' for r in rows)} passed, {sum(r[1] == 'skipped' for r in rows)} "
          f"skipped; logs in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
