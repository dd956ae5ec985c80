"""Does it learn? Known-answer tasks and the papers' ablations at small scale, with one command.

    bash run.sh reproduce          # the full run (about 90 min on 2 CPU cores)
    bash run.sh reproduce quick    # the same at a smaller scale (about 10 min)
    python reproduce.py --scale quick --out results/reproduce-quick   # run again: finished parts are reused

Everything is offline and generated from seeds (textdata/synthetic.py, docs/algorithms.md §5):

1. **Synthetic language** (a sparse Markov chain with a Zipf-like spectrum; exact entropy and
   log-likelihood). An absorbing model from scratch on a word-level tokenizer; its test NLL bound
   (``compute_elbo.py``) beside the true entropy and the exact NLL of the same test sequences; its
   samples (``predict.py``, our sampler and the released one, 8..512 steps) scored exactly
   (``compute_metric.py --mode synthetic``).
2. **DiffusionBERT's ablations** on that language, at equal budgets, over seeds: spindle against
   mutual, TAD against layer-wise and token (prefix) time conditioning, the released loss weighting
   against the ELBO one; and on the Bible LM, pretrained MiniLM against the same network from scratch.
3. **Synthetic seq2seq with one right answer** (reverse the source, map each word through a fixed
   bijection): conditional DiffusionBERT and DiffuSeq; DiffuSeq decoded with the full chain,
   uniform_20, adp_20, adp_10 and adp_4, before and after Tang et al.'s post-training.

Writes ``<out>/results.md`` (tables, the targets met or not, embedded plots), ``<out>/results.json``
and ``<out>/plots/*.png``. Every step runs one of the repository's scripts (logs in ``<out>/logs``);
a step whose output exists is reused, and a training run that was killed resumes from its last
checkpoint, so the same command continues an interrupted reproduction.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from common.errors import UserError, cli_main
from common.io import write_json_atomic, write_text_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))

# Per scale: the data, the training budgets and the evaluation sizes. A budget is optimizer steps at a
# fixed batch, the same for every variant of an ablation.
SCALES = {
    # smoke: every step at a trivial size, to check the pipeline (tests, debugging); its numbers mean nothing
    "smoke": dict(
        lm_lines=(400, 60, 60), lm_steps=20, lm_batch=16, seeds=(0, 1), elbo_steps=4,
        samples=12, sample_steps=(2, 4), ablations=("mutual",),
        bible_steps=2, bible_seeds=(0,), bible_eval=8,
        s2s_lines=(300, 20, 20), s2s_steps=20, s2s_post_steps=10, s2s_decode=10,
        respacings=("uniform_4", "adp_4")),
    "quick": dict(
        lm_lines=(8000, 500, 500), lm_steps=800, lm_batch=64, seeds=(0,), elbo_steps=64,
        samples=200, sample_steps=(8, 32, 128, 512), ablations=("mutual", "elbo"),
        bible_steps=30, bible_seeds=(0,), bible_eval=32,
        s2s_lines=(8000, 200, 200), s2s_steps=800, s2s_post_steps=200, s2s_decode=50,
        respacings=("uniform_20", "adp_20", "adp_4")),  # the full chain (2000 calls) is the full scale's
    "full": dict(
        lm_lines=(20000, 1000, 1000), lm_steps=3000, lm_batch=128, seeds=(0, 1, 2), elbo_steps=128,
        samples=500, sample_steps=(8, 16, 32, 64, 128, 256, 512), ablations=("mutual", "layerwise", "token", "elbo"),
        bible_steps=200, bible_seeds=(0, 1, 2), bible_eval=128,
        s2s_lines=(20000, 500, 500), s2s_steps=4000, s2s_post_steps=1000, s2s_decode=300,
        respacings=("full", "uniform_20", "adp_20", "adp_10", "adp_4")),
}

# DiffusionBERT as released (the base variant), and one change per ablation
LM_BASE = dict(schedule="spindle", time_conditioning="none", loss_weighting="released")
LM_VARIANTS = {"base": {}, "mutual": {"schedule": "mutual"}, "layerwise": {"time_conditioning": "layerwise"},
               "token": {"time_conditioning": "token"}, "elbo": {"loss_weighting": "elbo"}}
VARIANT_LABELS = {"base": "spindle + TAD + released loss (DiffusionBERT)", "mutual": "mutual schedule",
                  "layerwise": "layer-wise time embedding", "token": "time as a prefix token",
                  "elbo": "ELBO-weighted loss"}


class Runner:
    """Runs the repository's scripts as subprocesses, ``jobs`` at a time, each with ``threads`` threads;
    a step whose ``done`` path exists is skipped."""

    def __init__(self, out: str, jobs: int, threads: int):
        self.out, self.jobs, self.threads = out, jobs, threads
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def env(self) -> dict:
        return dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                    TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                    HF_DATASETS_CACHE=os.path.join(self.out, ".hf_cache"), PYTHONPATH=ROOT)

    def run(self, name: str, script: str, args: list[str], done: str) -> None:
        """Run ``script args`` unless ``done`` exists."""
        if os.path.exists(done):
            return
        log = os.path.join(self.logs, f"{name}.log")
        start = time.time()
        with open(log, "w", encoding="utf-8") as f:
            proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                                  env=self.env(), stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            with open(log, encoding="utf-8", errors="replace") as f:
                tail = [line for line in f.read().replace("\r", "\n").splitlines() if line.strip()][-1:]
            raise UserError(f"reproduce: step {name} failed (exit {proc.returncode}): {tail[0] if tail else ''} "
                            f"(log: {log}); run the same command again to continue")
        print(f"  {name}: {time.time() - start:.0f}s", flush=True)

    def train(self, name: str, args: list[str]) -> str:
        """A train.py run in ``<out>/runs/<name>``: reused when finished, resumed when killed halfway."""
        run_dir = os.path.join(self.out, "runs", name)
        done = os.path.join(run_dir, "reproduce.done")
        if os.path.exists(done):
            return run_dir
        last = os.path.join(run_dir, "checkpoints", "last")
        extra = ["--resume", run_dir] if os.path.isdir(last) else ["--overwrite"]
        self.run(f"train-{name}", "train.py", [*args, "--out_dir", run_dir, "--log_dir",
                                              os.path.join(self.out, "fitlog"), *extra], done)
        write_text_atomic(done, "finished\n")
        return run_dir

    def parallel(self, calls: list) -> list:
        """Run the zero-argument callables ``jobs`` at a time; results in order."""
        from tqdm import tqdm
        results = [None] * len(calls)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool, tqdm(total=len(calls), leave=False,
                                                                      dynamic_ncols=True) as bar:
            futures = {pool.submit(c): i for i, c in enumerate(calls)}
            for fut in futures:
                results[futures[fut]] = fut.result()
                bar.update(1)
        return results


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def mean_std(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_ms(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


# --------------------------------------------------------------------------- data


def make_data(out: str, sc: dict) -> dict:
    """The synthetic language, its LM and seq2seq folders, the word-level tokenizer and model configs."""
    from textdata.synthetic import SyntheticLanguage, write_lm_folder, write_seq2seq_folder, write_tokenizer
    data = os.path.join(out, "data")
    paths = {"lm": os.path.join(data, "lm"), "s2s": os.path.join(data, "seq2seq"),
             "model": os.path.join(data, "model"), "s2s_model": os.path.join(data, "seq2seq_model")}
    paths["language"] = os.path.join(paths["lm"], "language.json")
    if not os.path.exists(os.path.join(data, "done")):
        lang = SyntheticLanguage.generate(seed=0)
        write_lm_folder(lang, paths["lm"], *sc["lm_lines"], seed=1)
        write_seq2seq_folder(lang, paths["s2s"], *sc["s2s_lines"], seed=2)
        write_tokenizer(lang.words, paths["model"], hidden_size=128, num_layers=3, num_heads=4, max_position=32)
        write_tokenizer(lang.words, paths["s2s_model"], hidden_size=128, num_layers=3, num_heads=4, max_position=64)
        write_text_atomic(os.path.join(data, "done"), "ok\n")
    return paths


# --------------------------------------------------------------------------- 1 + 2: synthetic LM


def lm_args(paths: dict, sc: dict, variant: str, seed: int, wf: str) -> list[str]:
    v = {**LM_BASE, **LM_VARIANTS[variant]}
    steps = sc["lm_steps"]
    return ["--model_name_or_path", paths["model"], "--from_scratch", "--dataset", "text", "--data_files", paths["lm"],
            "--max_len", 24, "--num_steps", 1000, "--schedule", v["schedule"], "--word_freq_file", wf,
            "--time_conditioning", v["time_conditioning"], "--loss_weighting", v["loss_weighting"],
            "--batch_size", sc["lm_batch"], "--lr", "2e-3", "--decay", "cosine", "--warmup_steps", max(1, steps // 20),
            "--max_steps", steps, "--eval_every", max(1, steps // 10), "--eval_examples", 500, "--eval_steps", 32,
            "--save_every", max(1, steps // 5), "--log_every", max(1, steps // 40), "--dropout", 0.0,
            "--seed", seed, "--device", "cpu"]


def elbo(runner: Runner, run_dir: str, name: str, sc: dict, batch: int = 250, baselines: bool = False) -> dict:
    """compute_elbo.py on the whole test split (``baselines``: also the untrained network and a unigram model)."""
    out = os.path.join(runner.out, "elbo", f"{name}.json")
    runner.run(f"elbo-{name}", "compute_elbo.py", ["--checkpoint", run_dir, "--num_examples", 0, "--eval_steps",
                                                   sc["elbo_steps"], "--batch_size", batch, "--seed", 0,
                                                   "--device", "cpu", "--out", out, "--overwrite",
                                                   *(["--baselines"] if baselines else [])], out)
    return read_json(out)


def synthetic_lm(runner: Runner, paths: dict, sc: dict) -> dict:
    from textdata.synthetic import SyntheticLanguage, score
    lang = SyntheticLanguage.load(paths["language"])
    with open(os.path.join(paths["lm"], "test.txt"), encoding="utf-8") as f:
        test_lines = f.read().splitlines()
    truth = {"entropy": lang.entropy(), "test": score(lang, test_lines)}
    wf = os.path.join(runner.out, "word_freq", "synthetic.json")
    runner.run("word-freq-synthetic", "word_freq.py", ["--model_name_or_path", paths["model"], "--dataset", "text",
                                                      "--data_files", paths["lm"], "--out", wf, "--overwrite"], wf)

    variants = ["base", *sc["ablations"]]
    jobs = [(v, s) for v in variants for s in sc["seeds"]]
    print(f"== synthetic LM: {len(jobs)} training runs ({', '.join(variants)} x seeds {list(sc['seeds'])})", flush=True)
    runs = dict(zip(jobs, runner.parallel([lambda v=v, s=s: runner.train(f"lm-{v}-s{s}", lm_args(paths, sc, v, s, wf))
                                           for v, s in jobs])))
    print("== synthetic LM: test NLL bounds", flush=True)
    first = ("base", sc["seeds"][0])  # with the untrained network's bound and a unigram model beside it
    bounds = dict(zip(jobs, runner.parallel([lambda v=v, s=s: elbo(runner, runs[(v, s)], f"lm-{v}-s{s}", sc,
                                                                   baselines=(v, s) == first) for v, s in jobs])))
    per_token = {k: b["nll_bound" if k == "untrained" else "nll"] / b["tokens"]
                 for k, b in bounds[first]["baselines"].items()}

    print("== synthetic LM: sampling sweep", flush=True)
    base = runs[("base", sc["seeds"][0])]
    sweep = {}
    for sampler in ("ours", "released"):
        for steps in sc["sample_steps"]:
            name = f"lm-base-{sampler}-{steps}"
            gen_dir = os.path.join(runner.out, "samples")
            txt = os.path.join(gen_dir, f"{name}.txt")
            runner.run(f"sample-{name}", "predict.py", ["--checkpoint", base, "--num_samples", sc["samples"],
                                                        "--steps", steps, "--sampler", sampler, "--batch_size", 100,
                                                        "--seed", 1, "--device", "cpu", "--out_dir", gen_dir,
                                                        "--name", name, "--overwrite"], txt)
            metric = os.path.join(gen_dir, f"{name}.metrics.json")
            runner.run(f"score-{name}", "compute_metric.py", ["--mode", "synthetic", "--samples", txt, "--language",
                                                              paths["language"], "--out", metric, "--overwrite"], metric)
            sweep[(sampler, steps)] = {**read_json(metric)["metrics"], **{
                k: read_json(os.path.join(gen_dir, f"{name}.json"))[k] for k in ("sequences_per_second",
                                                                                  "network_calls", "wall_seconds")}}
    curves = {v: [read_metrics_dev(runs[(v, s)]) for s in sc["seeds"]] for v in variants}
    return {"truth": truth, "variants": variants, "runs": runs, "bounds": bounds, "baselines": per_token,
            "sweep": sweep, "curves": curves}


def read_metrics_dev(run_dir: str) -> tuple[list[int], list[float]]:
    from evaluation.plots import read_metrics
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"), "dev", "nelbo_per_token")


# --------------------------------------------------------------------------- 2b: Bible LM, pretrained vs scratch


def bible_lm(runner: Runner, sc: dict) -> dict:
    wf = os.path.join(runner.out, "word_freq", "minilm__bible.json")
    runner.run("word-freq-bible", "word_freq.py", ["--model_name_or_path", "minilm", "--dataset", "bible",
                                                  "--data_dir", os.path.join(runner.out, "data", "bible"),
                                                  "--out", wf, "--overwrite"], wf)
    jobs = [(init, s) for init in ("pretrained", "scratch") for s in sc["bible_seeds"]]
    print(f"== Bible LM: {len(jobs)} training runs (pretrained MiniLM / from scratch x seeds {list(sc['bible_seeds'])})",
          flush=True)

    def one(init: str, seed: int) -> dict:
        steps = sc["bible_steps"]
        run_dir = runner.train(f"bible-{init}-s{seed}", [
            "--model_name_or_path", "minilm", *(["--from_scratch"] if init == "scratch" else []),
            "--dataset", "bible", "--data_dir", os.path.join(runner.out, "data", "bible"), "--max_len", 64,
            "--num_steps", 2048, "--schedule", "spindle", "--word_freq_file", wf, "--time_conditioning", "none",
            "--loss_weighting", "released", "--batch_size", 16, "--lr", "1.5e-4", "--warmup_steps", max(1, steps // 10),
            "--max_steps", steps, "--eval_every", 0, "--eval_examples", 64, "--eval_steps", 8,
            "--save_every", steps, "--log_every", max(1, steps // 10), "--seed", seed, "--device", "cpu"])
        out = os.path.join(runner.out, "elbo", f"bible-{init}-s{seed}.json")
        runner.run(f"elbo-bible-{init}-s{seed}", "compute_elbo.py", [
            "--checkpoint", run_dir, "--num_examples", sc["bible_eval"], "--eval_steps", 32, "--batch_size", 64,
            "--seed", 42, "--device", "cpu", "--out", out, "--overwrite"], out)
        return read_json(out)

    res = dict(zip(jobs, runner.parallel([lambda i=i, s=s: one(i, s) for i, s in jobs])))
    return {"bounds": res}


# --------------------------------------------------------------------------- 3: synthetic seq2seq


def seq2seq(runner: Runner, paths: dict, sc: dict) -> dict:
    steps, post_steps = sc["s2s_steps"], sc["s2s_post_steps"]
    common = ["--task", "seq2seq", "--dataset", "folder", "--data_files", paths["s2s"], "--max_len", 48,
              "--batch_size", 64, "--warmup_steps", max(1, steps // 20), "--max_steps", steps,
              "--eval_every", max(1, steps // 5), "--eval_examples", 200, "--save_every", max(1, steps // 5),
              "--log_every", max(1, steps // 40), "--seed", 0, "--device", "cpu"]
    print("== seq2seq: conditional DiffusionBERT and DiffuSeq", flush=True)
    absorbing_args = ["--model_name_or_path", paths["s2s_model"], "--from_scratch", "--num_steps", 2000,
                      "--schedule", "mutual", "--time_conditioning", "none", "--loss_weighting", "released",
                      "--hybrid_lambda", "3e-4", "--lr", "1e-3", "--eval_steps", 16, "--dropout", 0.0, *common]
    gaussian_args = ["--process", "gaussian", "--model_name_or_path", paths["s2s_model"], "--num_steps", 2000,
                     "--schedule", "sqrt", "--timestep_sampler", "lossaware", "--loss_average", "all",
                     "--emb_dim", 64, "--hidden_size", 128, "--num_layers", 3, "--num_heads", 4, "--lr", "1e-3",
                     "--ema_rate", 0.999, *common]
    absorbing_dir, gaussian_dir = runner.parallel([lambda: runner.train("s2s-absorbing", absorbing_args),
                                                   lambda: runner.train("s2s-diffuseq", gaussian_args)])
    post_dir = runner.train("s2s-diffuseq-post", override(gaussian_args, {
        "--max_steps": post_steps, "--warmup_steps": 0, "--eval_every": max(1, post_steps // 4),
        "--save_every": max(1, post_steps // 4), "--log_every": max(1, post_steps // 20)}) + [
        "--post_train", gaussian_dir, "--simi_penalty", "l2_noise_random", "--simi_lambda", -2, "--simi_noise", 0.05])

    def decode(name: str, run_dir: str, flags: list) -> dict:
        folder = os.path.join(runner.out, "decode", name)
        runner.run(f"decode-{name}", "predict_downstream_condition.py", [
            "--checkpoint", run_dir, "--split", "test", "--num_examples", sc["s2s_decode"], "--mbr_size", 1,
            "--batch_size", 100, "--seed", 0, "--device", "cpu", "--out_dir", os.path.join(runner.out, "decode"),
            "--name", name, "--overwrite", *flags], os.path.join(folder, "decode.json"))
        return folder

    jobs = [("absorbing", absorbing_dir, ["--steps", 200])]
    jobs += [(f"diffuseq-{r}", gaussian_dir, ["--decode_respacing", r]) for r in sc["respacings"]]
    jobs += [(f"diffuseq-post-{r}", post_dir, ["--decode_respacing", r]) for r in sc["respacings"]]
    print(f"== seq2seq: {len(jobs)} decodings", flush=True)
    folders = runner.parallel([lambda n=n, d=d, f=f: decode(n, d, f) for n, d, f in jobs])
    out = os.path.join(runner.out, "decode", "compare.json")
    runner.run("compare-seq2seq", "compute_metric.py", ["--mode", "compare", "--samples", *folders,
                                                        "--bertscore_model", "none", "--out", out, "--overwrite"], out)
    rows = {r["setting"]: r for r in read_json(out)["metrics"]["rows"]}
    copy = os.path.join(runner.out, "decode", "copy_source.metrics.json")
    runner.run("copy-source", "compute_metric.py", ["--mode", "seq2seq", "--samples",
                                                     os.path.join(folders[0], "copy_source.jsonl"),
                                                     "--bertscore_model", "none", "--out", copy, "--overwrite"], copy)
    return {"rows": rows, "copy_source": read_json(copy)["metrics"]}


def override(args: list, values: dict) -> list:
    """``args`` with the value after each flag in ``values`` replaced."""
    args = list(args)
    for flag, value in values.items():
        args[args.index(flag) + 1] = value
    return args


# --------------------------------------------------------------------------- report


def report(out: str, scale: str, sc: dict, lm: dict | None, bible: dict | None, s2s: dict | None, seconds: float) -> str:
    from evaluation.plots import line_plot
    plots = os.path.join(out, "plots")
    lines = [f"# Does it learn? (`bash run.sh reproduce{' quick' if scale == 'quick' else ''}`)", "",
             f"Scale `{scale}`; {seconds / 60:.1f} min of wall time for the steps run in this invocation; "
             f"{os.cpu_count()} CPU cores. Settings: `{json.dumps(sc)}`.", ""]
    summary = {"scale": scale, "settings": sc}
    if lm:
        t = lm["truth"]
        h_tok, h_given = t["entropy"]["per_token"], t["entropy"]["per_token_given_length"]
        test_nll, test_se = t["test"]["nll_per_token"], t["test"]["nll_per_token_se"]
        seeds = sc["seeds"]
        base = [lm["bounds"][("base", s)] for s in seeds]
        b_mean = statistics.fmean(b["nelbo_per_token"] for b in base)
        b_se = max(b["nelbo_per_token_se"] for b in base)
        below = [b for b in base if b["nelbo_per_token"] + 2 * b["nelbo_per_token_se"] < test_nll]
        s512 = lm["sweep"][("ours", max(sc["sample_steps"]))]
        lines += ["## 1. Synthetic language: the bound and the samples against the exact answer", "",
                  f"True entropy {h_tok:.4f} nats/token ({t['entropy']['per_sequence']:.3f} per sequence, "
                  f"{t['entropy']['length'] / t['entropy']['mean_length']:.4f} of it the length); exact NLL of the "
                  f"{t['test']['sequences']} test sequences {test_nll:.4f} ± {test_se:.4f} nats/token.", "",
                  "| model | test NLL (bound), nats/token (K = %d) | ± s.e. | / true entropy |" % sc["elbo_steps"],
                  "|---|---|---|---|",
                  f"| the true language | {test_nll:.4f} | {test_se:.4f} | {test_nll / h_tok:.3f}x |",
                  f"| unigram (add-one, training counts) | {lm['baselines']['unigram']:.4f} | | "
                  f"{lm['baselines']['unigram'] / h_tok:.2f}x |",
                  f"| untrained network (step 0) | {lm['baselines']['untrained']:.4f} | | "
                  f"{lm['baselines']['untrained'] / h_tok:.2f}x |"]
        for s, b in zip(seeds, base):
            lines.append(f"| base, seed {s} | {b['nelbo_per_token']:.4f} | {b['nelbo_per_token_se']:.4f} | "
                         f"{b['nelbo_per_token'] / h_tok:.3f}x |")
        ok_floor = not below
        ok_close = b_mean <= 1.10 * h_tok
        ok_forbidden = s512["sample_forbidden_fraction"] <= 0.02
        # the exact NLL exists only for samples without a forbidden transition: it says little when many have one
        ok_nll = ok_forbidden and abs(s512.get("sample_nll_per_token", math.inf) / test_nll - 1) <= 0.10
        lines += ["", "Targets:",
                  f"- never below the truth beyond 2 s.e.: **{'holds' if ok_floor else 'FAILS: a bug'}**",
                  f"- bound within 10% of the true entropy: **{'holds' if ok_close else 'not reached'}** "
                  f"({b_mean / h_tok:.3f}x)",
                  f"- sample NLL within 10% of held-out sequences (ours, {max(sc['sample_steps'])} steps; counted only "
                  f"when at most 2% of the samples break the language): **{'holds' if ok_nll else 'not reached'}** "
                  f"({s512.get('sample_nll_per_token', math.nan):.4f} on the {100 * (1 - s512['sample_invalid_fraction']):.0f}% of "
                  f"samples that have a likelihood, vs {test_nll:.4f})",
                  f"- at most 2% of samples with a forbidden transition: **{'holds' if ok_forbidden else 'not reached'}** "
                  f"({100 * s512['sample_forbidden_fraction']:.1f}%)", ""]
        summary["lm"] = {"true_entropy_per_token": h_tok, "test_nll_per_token": test_nll, "bound_mean": b_mean,
                         "bound_se": b_se, "baselines": lm["baselines"],
                         "targets": {"floor": ok_floor, "within_10pct": ok_close, "sample_nll": ok_nll,
                                     "forbidden": ok_forbidden}}
        # sampling sweep
        lines += ["### Sample quality against sampling steps", "",
                  "Sample NLL is the exact NLL per token of the samples that have a likelihood; `forbidden` is the "
                  "fraction with a transition the language never makes. A step count matches the "
                  f"{max(sc['sample_steps'])}-step quality when its NLL is within 5% and its forbidden fraction within "
                  "5 points of it.", "",
                  "| sampler | steps | sample NLL/token | forbidden | sequences/s | network calls |", "|---|---|---|---|---|---|"]
        fewest = {}
        for sampler in ("ours", "released"):
            top = lm["sweep"][(sampler, max(sc["sample_steps"]))]
            ref, ref_bad = top.get("sample_nll_per_token", math.nan), top["sample_forbidden_fraction"]
            for steps in sc["sample_steps"]:
                m = lm["sweep"][(sampler, steps)]
                lines.append(f"| {sampler} | {steps} | {m.get('sample_nll_per_token', float('nan')):.4f} | "
                             f"{100 * m['sample_forbidden_fraction']:.1f}% | {m['sequences_per_second']:.1f} | "
                             f"{m['network_calls']} |")
                if (sampler not in fewest and abs(m.get("sample_nll_per_token", math.inf) / ref - 1) <= 0.05
                        and m["sample_forbidden_fraction"] <= ref_bad + 0.05):
                    fewest[sampler] = (steps, m["sequences_per_second"])
        lines += [""] + [f"- {s}: the fewest steps that match its {max(sc['sample_steps'])}-step quality: "
                         f"**{fewest[s][0]}**, at {fewest[s][1]:.1f} sequences/s" for s in fewest] + [""]
        summary["lm"]["fewest_steps"] = fewest
        line_plot(os.path.join(plots, "sample_quality.png"),
                  [{"label": f"{s} sampler", "x": list(sc["sample_steps"]),
                    "y": [lm["sweep"][(s, k)].get("sample_nll_per_token", float("nan")) for k in sc["sample_steps"]]}
                   for s in ("ours", "released")],
                  "Synthetic language: exact NLL of the samples", "sampling steps", "nats/token",
                  hlines=[{"label": "held-out sequences", "y": test_nll}, {"label": "true entropy", "y": h_tok}],
                  logx=True)
        lines += ["![sample quality](plots/sample_quality.png)", ""]
        # ablations
        lines += ["## 2. DiffusionBERT's ablations on the synthetic language", "",
                  f"Equal budgets: {sc['lm_steps']} steps at batch {sc['lm_batch']}; seeds {list(seeds)}; "
                  f"test NLL bound (nats/token; the truth is {h_tok:.4f}), mean ± std over seeds.", "",
                  "| variant | test NLL bound | vs base |", "|---|---|---|"]
        base_vals = [b["nelbo_per_token"] for b in base]
        for v in lm["variants"]:
            vals = [lm["bounds"][(v, s)]["nelbo_per_token"] for s in seeds]
            lines.append(f"| {VARIANT_LABELS[v]} | {fmt_ms(vals)} | {statistics.fmean(vals) - statistics.fmean(base_vals):+.3f} |")
        lines += [""]
        series = []
        for v in lm["variants"]:
            steps_ = lm["curves"][v][0][0]
            ys = [statistics.fmean(c[1][i] for c in lm["curves"][v]) for i in range(len(steps_))]
            series.append({"label": VARIANT_LABELS[v], "x": steps_, "y": ys})
        line_plot(os.path.join(plots, "dev_nelbo.png"), series, "Synthetic language: dev NELBO (no length term)",
                  "optimizer step", "nats/token", hlines=[{"label": "true entropy given the length", "y": h_given}])
        lines += ["![dev NELBO](plots/dev_nelbo.png)", ""]
    if bible:
        lines += ["### Bible LM: pretrained MiniLM against the same network from scratch", "",
                  f"{sc['bible_steps']} steps at batch 16 each; test bound on {sc['bible_eval']} verses (K = 32).", "",
                  "| initialisation | PPL bound per word | per wordpiece |", "|---|---|---|"]
        for init in ("pretrained", "scratch"):
            vals = [bible["bounds"][(init, s)] for s in sc["bible_seeds"]]
            lines.append(f"| {init} | {fmt_ms([v['ppl_word'] for v in vals], 1)} | {fmt_ms([v['ppl_token'] for v in vals], 1)} |")
        lines += [""]
    if s2s:
        rows, copy = s2s["rows"], s2s["copy_source"]
        lines += ["## 3. Synthetic seq2seq: reverse the source and map each word", "",
                  f"Copying the source scores exact match {copy['exact_match']:.3f}, BLEU {copy['bleu']:.4f}.", "",
                  "| model / decoding | exact match | token accuracy | BLEU | network calls per sequence | wall s |",
                  "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['exact_match']:.3f} | {r['token_accuracy']:.3f} | {r['bleu']:.4f} | "
                         f"{r['calls_per_sequence']:.0f} | {r['wall_seconds']:.1f} |")
        a = rows.get("absorbing", {})
        g_name = "diffuseq-" + sc["respacings"][0]  # the full chain where the scale decodes it
        g = rows.get(g_name, {})
        lines += ["", "Targets (at least 90% exact match and BLEU 0.95):",
                  f"- conditional DiffusionBERT: **{'holds' if a.get('exact_match', 0) >= 0.9 and a.get('bleu', 0) >= 0.95 else 'not reached'}**",
                  f"- DiffuSeq ({sc['respacings'][0]}): **{'holds' if g.get('exact_match', 0) >= 0.9 and g.get('bleu', 0) >= 0.95 else 'not reached'}**", ""]
        series = []
        for tag, prefix in (("before post-training", "diffuseq-"), ("after post-training", "diffuseq-post-")):
            pts = sorted((rows[prefix + r]["calls_per_sequence"], rows[prefix + r]["exact_match"]) for r in sc["respacings"]
                         if prefix + r in rows)
            series.append({"label": tag, "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
        line_plot(os.path.join(plots, "seq2seq_steps.png"), series, "DiffuSeq on reverse-and-map: exact match",
                  "decoding steps (network calls per sequence)", "exact match", logx=True)
        lines += ["![seq2seq quality against steps](plots/seq2seq_steps.png)", ""]
        summary["seq2seq"] = {k: {m: r[m] for m in ("exact_match", "token_accuracy", "bleu", "calls_per_sequence",
                                                    "wall_seconds")} for k, r in rows.items()}
    write_json_atomic(os.path.join(out, "results.json"), json.loads(json.dumps(summary, default=str)))
    text = "\n".join(lines) + "\n"
    write_text_atomic(os.path.join(out, "results.md"), text)
    return text


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--out", default=None, help="results folder (default: results/reproduce-<time>); an existing "
                                               "one continues where it stopped")
    p.add_argument("--parts", default="lm,bible,seq2seq", help="comma-separated: lm, bible, seq2seq")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="runs side by side (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"lm", "bible", "seq2seq"}:
        raise UserError(f"--parts takes lm, bible and seq2seq, got {args.parts}")
    if args.jobs < 1 or args.threads < 1:
        raise UserError("--jobs and --threads must be at least 1")
    sc = SCALES[args.scale]
    out = args.out or os.path.join("results", f"reproduce-{args.scale}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    settings = os.path.join(out, "settings.json")
    if os.path.exists(settings) and read_json(settings) != json.loads(json.dumps({"scale": args.scale, **sc})):
        raise UserError(f"{out} was made with other settings ({settings}); its steps cannot be reused: give a new --out")
    write_json_atomic(settings, {"scale": args.scale, **sc})
    print(f"reproduce: scale {args.scale}, results in {out}", flush=True)
    runner = Runner(os.path.abspath(out), args.jobs, args.threads)
    start = time.time()
    paths = make_data(runner.out, sc)
    lm = synthetic_lm(runner, paths, sc) if "lm" in parts else None
    bible = bible_lm(runner, sc) if "bible" in parts else None
    s2s = seq2seq(runner, paths, sc) if "seq2seq" in parts else None
    text = report(runner.out, args.scale, sc, lm, bible, s2s, time.time() - start)
    print("\n" + text)
    print(f"reproduce: wrote {os.path.join(out, 'results.md')} in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
