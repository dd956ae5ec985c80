"""Does it learn? Known-answer tasks and the papers' ablations at small scale, with one command.

    bash run.sh reproduce          # parts 1-3, the full run (about 70 min on 2 CPU cores)
    bash run.sh reproduce quick    # the same at a smaller scale (about 7 min)
    bash run.sh reproduce --parts glm --out results/reproduce-full-<time>   # part 4, beside a finished run
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
   uniform_20, adp_20, adp_10 and adp_4, before and after Tang et al.'s post-training, and after its
   control (the same extra steps without the penalty).
4. **The Gaussian LM** (``--parts glm``): Diffusion-LM trained for about part 1's training time, against
   part 1's DiffusionBERT (it reuses that model when run in the same ``--out``, else trains it): its
   test bound, its samples with the full chain and adp_N before and after post-training and the
   control, infilling of held-out sentences with 30% of their words masked (exact-word accuracy and
   the exact NLL of the filled sentence), and ``--length`` control, for both processes.

Writes ``<out>/results.md`` (tables, the targets met or not, embedded plots), ``<out>/results.json``
and ``<out>/plots/*.png``. Every step runs one of the repository's scripts (logs in ``<out>/logs``);
a step whose output exists is reused, and a training run that was killed resumes from its last
checkpoint, so the same command continues an interrupted reproduction.
"""
from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from common.cli import make_parser
from common.errors import UserError, cli_main
from common.io import write_json_atomic, write_text_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))

# The Gaussian LM's step budget at full scale: the absorbing model's training time (``lm_long``: 3000 steps
# at batch 128). Side by side on 2 cores, 150 steps at batch 128 took 145 s for the Gaussian LM and 133 s
# for DiffusionBERT (1 thread each), so 3000 x 133 / 145 steps.
GLM_FULL_STEPS = 2750

# Per scale: the data, the training budgets and the evaluation sizes. A budget is optimizer steps at a
# fixed batch, the same for every variant of an ablation (``lm_steps`` at ``lm_batch``); the base variant is
# also trained once for longer (``lm_long``: steps, batch) for the targets against the exact entropy and the
# sampling sweep (the ablation's seed-0 base run when it is the same). ``s2s_full_decode``: test pairs
# decoded with DiffuSeq's full chain (2000 calls each); the other decodings use ``s2s_decode``.
SCALES = {
    # smoke: every step at a trivial size, to check the pipeline (debugging); its numbers mean nothing
    "smoke": dict(
        lm_lines=(400, 60, 60), lm_steps=20, lm_batch=16, lm_long=(30, 16), seeds=(0, 1), elbo_steps=4,
        samples=12, sample_steps=(2, 4), ablations=("mutual", "token"),
        bible_steps=2, bible_seeds=(0,), bible_eval=8,
        s2s_lines=(300, 20, 20), s2s_steps=20, s2s_post_steps=10, s2s_decode=10, s2s_full_decode=4,
        respacings=("full", "adp_4"), glm_steps=20, glm_post_steps=10, glm_samples=12, glm_infill=10,
        glm_respacings=("full", "adp_4")),
    "quick": dict(
        lm_lines=(8000, 500, 500), lm_steps=800, lm_batch=64, lm_long=(800, 64), seeds=(0,), elbo_steps=64,
        samples=200, sample_steps=(8, 32, 128, 512), ablations=("mutual", "elbo"),
        bible_steps=15, bible_seeds=(0,), bible_eval=32,
        s2s_lines=(8000, 200, 200), s2s_steps=600, s2s_post_steps=100, s2s_decode=50, s2s_full_decode=0,
        respacings=("uniform_20", "adp_20", "adp_4"), glm_steps=800, glm_post_steps=100, glm_samples=100,
        glm_infill=100, glm_respacings=("adp_20", "adp_4")),
    "full": dict(
        lm_lines=(20000, 1000, 1000), lm_steps=1000, lm_batch=64, lm_long=(3000, 128), seeds=(0, 1, 2),
        elbo_steps=64, samples=500, sample_steps=(8, 16, 32, 64, 128, 256, 512),
        ablations=("mutual", "layerwise", "token", "elbo"),
        bible_steps=100, bible_seeds=(0, 1, 2), bible_eval=64,
        s2s_lines=(20000, 500, 500), s2s_steps=5000, s2s_post_steps=1000, s2s_decode=300, s2s_full_decode=100,
        respacings=("full", "uniform_20", "adp_20", "adp_10", "adp_4"), glm_steps=GLM_FULL_STEPS,
        glm_post_steps=1000, glm_samples=500, glm_infill=300, glm_respacings=("full", "adp_20", "adp_4")),
}
# the priority of each part's steps when they wait for a slot (lowest first): the seq2seq chain is longest
PRIORITY = {"seq2seq": 0, "lm": 1, "glm": 1, "bible": 2}
PARTS = ("seq2seq", "lm", "glm", "bible")  # the order in which they start
# part 4 is asked for by name (`--parts glm`, or `--parts seq2seq,lm,glm,bible`): with it the full run would
# pass 90 minutes and the quick one 10; smoke checks every part
DEFAULT_PARTS = {"quick": ("seq2seq", "lm", "bible"), "full": ("seq2seq", "lm", "bible")}

LM_T = 1000  # diffusion steps of the synthetic LM

# DiffusionBERT as released (the base variant), and one change per ablation
LM_BASE = dict(schedule="spindle", time_conditioning="none", loss_weighting="released")
LM_VARIANTS = {"base": {}, "mutual": {"schedule": "mutual"}, "layerwise": {"time_conditioning": "layerwise"},
               "token": {"time_conditioning": "token"}, "elbo": {"loss_weighting": "elbo"}}
# what DiffusionBERT's paper reports for each change to its model (Table 2 and its ablations, LM1B)
PAPER_DIRECTION = {"base": "", "mutual": "worse (PPL 78.76 vs 63.78)", "layerwise": "worse (77.50 vs 63.78, D3PM)",
                   "token": "worse (its time-embedding ablation)",
                   "elbo": "no claim (the released weighting is a code fact, docs/differences.md)"}
VARIANT_LABELS = {"base": "spindle + TAD + released loss (DiffusionBERT)", "mutual": "mutual schedule",
                  "layerwise": "layer-wise time embedding", "token": "time as a prefix token (vocabulary + 1000 [unused])",
                  "elbo": "ELBO-weighted loss"}


class Runner:
    """Runs the repository's scripts as subprocesses, at most ``jobs`` at a time, each with ``threads``
    threads; a step whose ``done`` path exists is skipped.

    Steps may be requested from many threads at once (the parts run side by side); when a slot frees,
    the waiting step with the lowest ``priority`` (then the earliest) takes it, so that the longest chain
    (seq2seq training, post-training, then decoding) is never queued behind the short runs that fill the
    gaps; a freed slot is held a few seconds for a step of the same or a lower priority, so that the next
    step of a chain is not overtaken while it starts. After a failure no new step starts and the running ones are stopped (a training run saves and
    can be resumed)."""

    def __init__(self, out: str, jobs: int, threads: int):
        from tqdm import tqdm
        self.out, self.jobs, self.threads = out, jobs, threads
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int]] = []  # heap of (priority, ticket)
        self._tickets = itertools.count()
        self._free = jobs
        self._held_until, self._held_for = 0.0, 0
        self._procs: set[subprocess.Popen] = set()
        self._step_locks: dict[str, threading.RLock] = {}  # one per output: two parts asking for a step share it
        self.failed: str | None = None
        # a bar on a terminal only (disable=None); the finished steps are printed either way
        self.bar = tqdm(total=0, desc="reproduce steps", dynamic_ncols=True, leave=False, disable=None)

    def env(self) -> dict:
        return dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                    TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                    HF_DATASETS_CACHE=os.path.join(self.out, ".hf_cache"), PYTHONPATH=ROOT)

    # a slot freed by a step stays its part's for a moment, for the step that follows it in its chain
    HANDOVER_SECONDS = 5.0

    def _acquire(self, priority: int) -> None:
        with self._cond:
            ticket = (priority, next(self._tickets))
            heapq.heappush(self._waiting, ticket)

            def ready() -> bool:
                held = time.monotonic() < self._held_until and priority > self._held_for
                return bool(self.failed) or (self._free > 0 and self._waiting[0] == ticket and not held)
            while not self._cond.wait_for(ready, timeout=1.0):
                pass
            self._waiting.remove(ticket)
            heapq.heapify(self._waiting)
            if self.failed:
                self._cond.notify_all()
                raise UserError(self.failed)
            self._free -= 1
            self._cond.notify_all()

    def _release(self, priority: int) -> None:
        with self._cond:
            self._free += 1
            self._held_until, self._held_for = time.monotonic() + self.HANDOVER_SECONDS, priority
            self._cond.notify_all()

    def say(self, message: str) -> None:
        with self._cond:
            self.bar.write(message)

    def fail(self, message: str) -> None:
        """Start nothing more and stop the running steps."""
        with self._cond:
            self.failed = self.failed or message
            for proc in self._procs:
                proc.terminate()
            self._cond.notify_all()

    def run(self, name: str, script: str, args: list[str], done: str, priority: int = 1) -> None:
        """Run ``script args`` unless ``done`` exists (a part that asks for a step another part is running
        waits for it)."""
        with self._step_lock(done):
            if not os.path.exists(done):
                self._run(name, script, args, done, priority)

    def _step_lock(self, done: str) -> threading.RLock:
        with self._cond:
            return self._step_locks.setdefault(done, threading.RLock())

    def _run(self, name: str, script: str, args: list[str], done: str, priority: int) -> None:
        with self._cond:
            self.bar.total += 1
            self.bar.refresh()
        self._acquire(priority)
        log = os.path.join(self.logs, f"{name}.log")
        start = time.time()
        try:
            with open(log, "w", encoding="utf-8") as f:
                proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                                        env=self.env(), stdout=f, stderr=subprocess.STDOUT)
                with self._cond:
                    self._procs.add(proc)
                try:
                    returncode = proc.wait()
                finally:
                    with self._cond:
                        self._procs.discard(proc)
        finally:
            self._release(priority)
        if returncode != 0:
            with open(log, encoding="utf-8", errors="replace") as f:
                tail = [line for line in f.read().replace("\r", "\n").splitlines() if line.strip()][-1:]
            message = (f"reproduce: step {name} failed (exit {returncode}): {tail[0] if tail else ''} "
                       f"(log: {log}); run the same command again to continue")
            if self.failed:  # stopped because another step failed
                raise UserError(self.failed)
            self.fail(message)
            raise UserError(message)
        with self._cond:
            self.bar.update(1)
            self.bar.write(f"  {name}: {time.time() - start:.0f}s")

    def train(self, name: str, args: list[str], priority: int = 1) -> str:
        """A train.py run in ``<out>/runs/<name>``: reused when finished, resumed when killed halfway."""
        run_dir = os.path.join(self.out, "runs", name)
        done = os.path.join(run_dir, "reproduce.done")
        with self._step_lock(done):
            if os.path.exists(done):
                return run_dir
            last = os.path.join(run_dir, "checkpoints", "last")
            extra = ["--resume", run_dir] if os.path.isdir(last) else ["--overwrite"]
            self.run(f"train-{name}", "train.py", [*args, "--out_dir", run_dir, "--log_dir",
                                                  os.path.join(self.out, "fitlog"), *extra], done, priority)
            write_text_atomic(done, "finished\n")
        return run_dir

    def parallel(self, calls: list) -> list:
        """Run the zero-argument callables side by side (their steps wait for slots); results in order.
        The first failure stops the rest and is raised."""
        results = [None] * len(calls)
        with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
            futures = [pool.submit(self._guard, c) for c in calls]
            for i, fut in enumerate(futures):
                results[i] = fut.result()
        return results

    def _guard(self, call):
        try:
            return call()
        except BaseException as e:
            self.fail(f"reproduce: {e}")
            raise


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def mean_std(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def direction(diff: float, spread: float, seeds: int, claim: bool, apart: bool = False) -> str:
    """Whether a variant's bound is worse than the base's (``diff`` > 0) beyond twice the seed-to-seed
    ``spread``; ``apart``: no seed of one lies within the other's range; ``claim``: the paper says worse."""
    word = "worse" if diff > 0 else "better"
    verdict = (": holds" if diff > 0 else ": does not hold") if claim else ""
    if seeds < 2:
        return f"{word} (one seed: no spread to judge by)"
    if abs(diff) <= 2 * spread:
        if apart:
            return f"{word} in every seed{verdict}, but the spread is large (std {spread:.3f})"
        return f"no clear difference ({diff:+.3f} is within 2 x std {spread:.3f})"
    size = f"{abs(diff) / spread:.0f}x std" if spread > 0 else "std 0"
    return f"{word}{verdict} ({size})"


def apart(a: list[float], b: list[float]) -> bool:
    return max(a) < min(b) or max(b) < min(a)


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
    # the prefix-token ablation needs a spare vocabulary entry per diffusion step (T = 1000), as BERT's
    # [unused*] entries are; the other variants keep the 305-entry vocabulary
    paths["model_token"] = os.path.join(data, "model_token")
    if not os.path.exists(os.path.join(paths["model_token"], "done")):
        lang = SyntheticLanguage.load(paths["language"])
        write_tokenizer(lang.words, paths["model_token"], hidden_size=128, num_layers=3, num_heads=4,
                        max_position=32, spare=LM_T)
        write_text_atomic(os.path.join(paths["model_token"], "done"), "ok\n")
    return paths


# --------------------------------------------------------------------------- 1 + 2: synthetic LM


def lm_args(paths: dict, sc: dict, variant: str, seed: int, wf: dict, steps: int, batch: int) -> list[str]:
    v = {**LM_BASE, **LM_VARIANTS[variant]}
    model = "model_token" if v["time_conditioning"] == "token" else "model"
    return ["--model_name_or_path", paths[model], "--from_scratch", "--dataset", "text", "--data_files", paths["lm"],
            "--max_len", 24, "--num_steps", LM_T, "--schedule", v["schedule"], "--word_freq_file", wf[model],
            "--time_conditioning", v["time_conditioning"], "--loss_weighting", v["loss_weighting"],
            "--batch_size", batch, "--lr", "2e-3", "--decay", "cosine", "--warmup_steps", max(1, steps // 20),
            "--max_steps", steps, "--eval_every", max(1, steps // 10), "--eval_examples", 500, "--eval_steps", 32,
            "--save_every", max(1, steps // 5), "--log_every", max(1, steps // 40), "--dropout", 0.0,
            "--seed", seed, "--device", "cpu"]


def elbo(runner: Runner, run_dir: str, name: str, sc: dict, batch: int = 250, baselines: bool = False) -> dict:
    """compute_elbo.py on the whole test split (``baselines``: also the untrained network and a unigram model)."""
    out = os.path.join(runner.out, "elbo", f"{name}.json")
    runner.run(f"elbo-{name}", "compute_elbo.py", ["--checkpoint", run_dir, "--num_examples", 0, "--eval_steps",
                                                   sc["elbo_steps"], "--batch_size", batch, "--seed", 0,
                                                   "--device", "cpu", "--out", out, "--overwrite",
                                                   *(["--baselines"] if baselines else [])], out, PRIORITY["lm"])
    return read_json(out)


def word_freqs(runner: Runner, paths: dict) -> dict:
    """The spindle schedule's token counts for the synthetic tokenizers: ``{model key: word_freq.json}``."""
    wf = {}
    for model, name in (("model", "synthetic"), ("model_token", "synthetic-spare")):
        wf[model] = os.path.join(runner.out, "word_freq", f"{name}.json")
        runner.run(f"word-freq-{name}", "word_freq.py", ["--model_name_or_path", paths[model], "--dataset", "text",
                                                        "--data_files", paths["lm"], "--out", wf[model],
                                                        "--overwrite"], wf[model], PRIORITY["lm"])
    return wf


def sample_and_score(runner: Runner, paths: dict, run_dir: str, name: str, flags: list, priority: int) -> dict:
    """``predict.py`` from ``run_dir`` with ``flags`` into ``<out>/samples/<name>.txt``, scored on the synthetic
    language (``compute_metric.py --mode synthetic``); with the sampling speed and cost."""
    gen_dir = os.path.join(runner.out, "samples")
    txt = os.path.join(gen_dir, f"{name}.txt")
    runner.run(f"sample-{name}", "predict.py", ["--checkpoint", run_dir, *flags, "--batch_size", 100, "--seed", 1,
                                                "--device", "cpu", "--out_dir", gen_dir, "--name", name,
                                                "--overwrite"], txt, priority)
    metric = os.path.join(gen_dir, f"{name}.metrics.json")
    runner.run(f"score-{name}", "compute_metric.py", ["--mode", "synthetic", "--samples", txt, "--language",
                                                      paths["language"], "--out", metric, "--overwrite"], metric,
               priority)
    return {**read_json(metric)["metrics"], **{k: read_json(os.path.join(gen_dir, f"{name}.json"))[k]
                                               for k in ("sequences_per_second", "network_calls", "wall_seconds")},
            "samples_file": txt}


def synthetic_lm(runner: Runner, paths: dict, sc: dict) -> dict:
    from textdata.synthetic import SyntheticLanguage, score
    lang = SyntheticLanguage.load(paths["language"])
    with open(os.path.join(paths["lm"], "test.txt"), encoding="utf-8") as f:
        test_lines = f.read().splitlines()
    truth = {"entropy": lang.entropy(), "test": score(lang, test_lines)}
    wf = word_freqs(runner, paths)
    variants = ["base", *sc["ablations"]]
    jobs = [(v, s) for v in variants for s in sc["seeds"]]
    long_steps, long_batch = sc["lm_long"]
    separate = (long_steps, long_batch) != (sc["lm_steps"], sc["lm_batch"])
    first = ("base", sc["seeds"][0])

    def train_and_bound(name: str, v: str, s: int, steps: int, batch: int, baselines: bool) -> tuple[str, dict]:
        run_dir = runner.train(name, lm_args(paths, sc, v, s, wf, steps, batch), PRIORITY["lm"])
        return run_dir, elbo(runner, run_dir, name, sc, baselines=baselines)

    # the base variant at the long budget (for the targets and the sampling sweep) is bounded beside the
    # untrained network and a unigram model; without a long budget of its own it is the ablation's seed-0 run
    calls = [lambda v=v, s=s: train_and_bound(f"lm-{v}-s{s}", v, s, sc["lm_steps"], sc["lm_batch"],
                                              not separate and (v, s) == first) for v, s in jobs]
    if separate:
        calls.insert(0, lambda: train_and_bound(long_run_name(sc), "base", sc["seeds"][0], long_steps, long_batch,
                                                True))
    runner.say(f"== synthetic LM: {len(calls)} training runs ({', '.join(variants)} x seeds {list(sc['seeds'])}"
               f"{'; the base at ' + str(long_steps) + ' steps' if separate else ''})")
    results = runner.parallel(calls)
    ablated = dict(zip(jobs, results[1:] if separate else results))
    long_dir, long_bound = results[0] if separate else ablated[first]
    runs = {k: r[0] for k, r in ablated.items()}
    bounds = {k: r[1] for k, r in ablated.items()}
    per_token = {k: b["nll_bound" if k == "untrained" else "nll"] / b["tokens"]
                 for k, b in long_bound["baselines"].items()}

    runner.say("== synthetic LM: sampling sweep")
    # one after another: the sequences/s of the sweep are comparable only without a sampler beside them
    grid = [(sampler, steps) for sampler in ("ours", "released") for steps in sc["sample_steps"]]
    sweep = {(sampler, steps): sample_and_score(runner, paths, long_dir, f"lm-base-{sampler}-{steps}", [
        "--num_samples", sc["samples"], "--steps", steps, "--sampler", sampler], PRIORITY["lm"])
        for sampler, steps in grid}
    curves = {v: [read_metrics_dev(runs[(v, s)]) for s in sc["seeds"]] for v in variants}
    return {"truth": truth, "variants": variants, "runs": runs, "bounds": bounds, "long": long_bound,
            "long_steps": (long_steps, long_batch), "long_curve": read_metrics_dev(long_dir),
            "baselines": per_token, "sweep": sweep, "curves": curves}


def read_metrics_dev(run_dir: str) -> tuple[list[int], list[float]]:
    from evaluation.plots import read_metrics
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"), "dev", "nelbo_per_token")


# --------------------------------------------------------------------------- 2b: Bible LM, pretrained vs scratch


def bible_lm(runner: Runner, sc: dict) -> dict:
    wf = os.path.join(runner.out, "word_freq", "minilm__bible.json")
    runner.run("word-freq-bible", "word_freq.py", ["--model_name_or_path", "minilm", "--dataset", "bible",
                                                  "--data_dir", os.path.join(runner.out, "data", "bible"),
                                                  "--out", wf, "--overwrite"], wf, PRIORITY["bible"])
    jobs = [(init, s) for init in ("pretrained", "scratch") for s in sc["bible_seeds"]]
    runner.say(f"== Bible LM: {len(jobs)} training runs (pretrained MiniLM / from scratch x seeds "
               f"{list(sc['bible_seeds'])})")

    def one(init: str, seed: int) -> dict:
        steps = sc["bible_steps"]
        run_dir = runner.train(f"bible-{init}-s{seed}", [
            "--model_name_or_path", "minilm", *(["--from_scratch"] if init == "scratch" else []),
            "--dataset", "bible", "--data_dir", os.path.join(runner.out, "data", "bible"), "--max_len", 64,
            "--num_steps", 2048, "--schedule", "spindle", "--word_freq_file", wf, "--time_conditioning", "none",
            "--loss_weighting", "released", "--batch_size", 16, "--lr", "1.5e-4", "--warmup_steps", max(1, steps // 10),
            "--max_steps", steps, "--eval_every", 0, "--eval_examples", 64, "--eval_steps", 8,
            "--save_every", steps, "--log_every", max(1, steps // 10), "--seed", seed, "--device", "cpu"],
            PRIORITY["bible"])
        out = os.path.join(runner.out, "elbo", f"bible-{init}-s{seed}.json")
        runner.run(f"elbo-bible-{init}-s{seed}", "compute_elbo.py", [
            "--checkpoint", run_dir, "--num_examples", sc["bible_eval"], "--eval_steps", 32, "--batch_size", 64,
            "--seed", 42, "--device", "cpu", "--out", out, "--overwrite"], out, PRIORITY["bible"])
        return read_json(out)

    res = dict(zip(jobs, runner.parallel([lambda i=i, s=s: one(i, s) for i, s in jobs])))
    return {"bounds": res}


# --------------------------------------------------------------------------- 3: synthetic seq2seq


def seq2seq(runner: Runner, paths: dict, sc: dict) -> dict:
    steps, post_steps, prio = sc["s2s_steps"], sc["s2s_post_steps"], PRIORITY["seq2seq"]
    common = ["--task", "seq2seq", "--dataset", "folder", "--data_files", paths["s2s"], "--max_len", 48,
              "--batch_size", 64, "--warmup_steps", max(1, steps // 20), "--max_steps", steps,
              "--eval_every", max(1, steps // 5), "--eval_examples", 200, "--save_every", max(1, steps // 5),
              "--log_every", max(1, steps // 40), "--seed", 0, "--device", "cpu"]
    absorbing_args = ["--model_name_or_path", paths["s2s_model"], "--from_scratch", "--num_steps", 2000,
                      "--schedule", "mutual", "--time_conditioning", "none", "--loss_weighting", "released",
                      "--hybrid_lambda", "3e-4", "--lr", "1e-3", "--eval_steps", 16, "--dropout", 0.0, *common]
    gaussian_args = ["--process", "gaussian", "--model_name_or_path", paths["s2s_model"], "--num_steps", 2000,
                     "--schedule", "sqrt", "--timestep_sampler", "lossaware", "--loss_average", "all",
                     "--emb_dim", 64, "--hidden_size", 128, "--num_layers", 3, "--num_heads", 4, "--lr", "1e-3",
                     "--ema_rate", 0.999, *common]
    # Post-training restarts from the converged model's EMA weights with a fresh optimizer for post_steps
    # steps. "more" is its control: the same restart and steps with DiffuSeq's own loss and no penalty, so
    # that the penalty is not credited with what extra training does.
    restart = {"--max_steps": post_steps, "--warmup_steps": 0, "--eval_every": max(1, post_steps // 4),
               "--save_every": max(1, post_steps // 4), "--log_every": max(1, post_steps // 20)}
    continued = {"post": ["--simi_penalty", "l2_noise_random", "--simi_lambda", -2, "--simi_noise", 0.05],
                 "more": ["--simi_penalty", "none"]}

    def decode(name: str, run_dir: str, flags: list) -> tuple[str, str]:
        folder = os.path.join(runner.out, "decode", name)
        pairs = sc["s2s_full_decode"] if "full" in flags else sc["s2s_decode"]
        runner.run(f"decode-{name}", "predict_downstream_condition.py", [
            "--checkpoint", run_dir, "--split", "test", "--num_examples", pairs, "--mbr_size", 1,
            "--batch_size", 100, "--seed", 0, "--device", "cpu", "--out_dir", os.path.join(runner.out, "decode"),
            "--name", name, "--overwrite", *flags], os.path.join(folder, "decode.json"), prio)
        return name, folder

    def respaced(prefix: str, run_dir: str) -> list:
        return runner.parallel([lambda r=r: decode(f"{prefix}-{r}", run_dir, ["--decode_respacing", r])
                                for r in sc["respacings"]])

    def absorbing_chain() -> list:
        run_dir = runner.train("s2s-absorbing", absorbing_args, prio)
        return [decode("absorbing", run_dir, ["--steps", 200])]

    def continued_chain(tag: str, gaussian_dir: str) -> list:
        run_dir = runner.train(f"s2s-diffuseq-{tag}", override(gaussian_args, restart) + [
            "--post_train", gaussian_dir, *continued[tag]], prio)
        return respaced(f"diffuseq-{tag}", run_dir)

    def gaussian_chain() -> list:
        run_dir = runner.train("s2s-diffuseq", gaussian_args, prio)
        parts = runner.parallel([lambda: respaced("diffuseq", run_dir)] +
                                [lambda t=t: continued_chain(t, run_dir) for t in ("post", "more")])
        return [d for part in parts for d in part]

    runner.say("== seq2seq: conditional DiffusionBERT; DiffuSeq, then its post-training and the control")
    gaussian, absorbing = runner.parallel([gaussian_chain, absorbing_chain])
    folders = dict(absorbing + gaussian)
    # compare.py compares folders that decode the same sources: the full chain's (fewer) apart
    rows = {}
    for group, names in (("", [n for n in folders if not n.endswith("-full")]),
                         ("-full", [n for n in folders if n.endswith("-full")])):
        if not names:
            continue
        out = os.path.join(runner.out, "decode", f"compare{group}.json")
        runner.run(f"compare-seq2seq{group}", "compute_metric.py", [
            "--mode", "compare", "--samples", *(folders[n] for n in names), "--bertscore_model", "none",
            "--out", out, "--overwrite"], out, prio)
        rows |= {r["setting"]: r for r in read_json(out)["metrics"]["rows"]}
    rows = {n: rows[n] for n in sorted(rows, key=list(folders).index)}
    copy = os.path.join(runner.out, "decode", "copy_source.metrics.json")
    runner.run("copy-source", "compute_metric.py", ["--mode", "seq2seq", "--samples",
                                                     os.path.join(folders["absorbing"], "copy_source.jsonl"),
                                                     "--bertscore_model", "none", "--out", copy, "--overwrite"],
               copy, prio)
    pairs = {name: read_json(os.path.join(folder, "decode.json")).get("num_sources") for name, folder in folders.items()}
    return {"rows": rows, "copy_source": read_json(copy)["metrics"], "pairs": pairs}


# --------------------------------------------------------------------------- 4: Gaussian LM, infilling, length

GLM_T = 2000  # Diffusion-LM's T
GLM_LENGTHS = (6, 10, 14, 18)  # --length: words per sample, cycled
INFILL_FRACTION = 0.3


def absorbing_long(runner: Runner, paths: dict, sc: dict) -> str:
    """The run directory of DiffusionBERT's base variant at the long budget (part 1 trains it; a part that
    needs it first waits for it or trains it)."""
    return runner.train(long_run_name(sc), lm_args(paths, sc, "base", sc["seeds"][0], word_freqs(runner, paths),
                                                   *sc["lm_long"]), PRIORITY["lm"])


def long_run_name(sc: dict) -> str:
    """Part 1's base model at the long budget: a run of its own, or the ablation's seed-0 base run when the
    budgets are the same (``synthetic_lm`` trains it; ``absorbing_long`` must find the same run)."""
    seed = sc["seeds"][0]
    return f"lm-base-long-s{seed}" if tuple(sc["lm_long"]) != (sc["lm_steps"], sc["lm_batch"]) else f"lm-base-s{seed}"


def glm_args(paths: dict, steps: int) -> list:
    """Diffusion-LM on the synthetic language: sqrt schedule, T = 2000, a 16-dimensional embedding, x0
    prediction with the rounding loss, a transformer from scratch the size of part 1's BERT (hidden 128,
    3 layers), batch 128 as part 1's long run."""
    return ["--process", "gaussian", "--task", "lm", "--model_name_or_path", paths["model"], "--dataset", "text",
            "--data_files", paths["lm"], "--max_len", 24, "--num_steps", GLM_T, "--schedule", "sqrt",
            "--emb_dim", 16, "--hidden_size", 128, "--num_layers", 3, "--num_heads", 4, "--dropout", 0.0,
            "--timestep_sampler", "lossaware", "--loss_average", "all", "--ema_rate", 0.999, "--batch_size", 128,
            "--lr", "1e-3", "--decay", "cosine", "--warmup_steps", max(1, steps // 20), "--max_steps", steps,
            "--eval_every", max(1, steps // 10), "--eval_examples", 500, "--save_every", max(1, steps // 5),
            "--log_every", max(1, steps // 40), "--seed", 0, "--device", "cpu"]


def train_seconds(run_dir: str) -> float:
    """Wall time of a finished training run, from its log's first and last records."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        times = [json.loads(line)["time"] for line in f if line.strip()]
    return times[-1] - times[0]


def gaussian_lm(runner: Runner, paths: dict, sc: dict) -> dict:
    """Diffusion-LM (Gaussian, unconditional) against DiffusionBERT on the synthetic language; its samples
    with the full chain and Tang et al.'s adaptive decay, before and after post-training (and the control);
    infilling of held-out sentences with 30% of their words masked, and length control, for both."""
    from evaluation.infill import make_templates
    prio, steps, post_steps = PRIORITY["glm"], sc["glm_steps"], sc["glm_post_steps"]
    restart = {"--max_steps": post_steps, "--warmup_steps": 0, "--eval_every": max(1, post_steps // 4),
               "--save_every": max(1, post_steps // 4), "--log_every": max(1, post_steps // 20)}
    continued = {"post": ["--simi_penalty", "l2_noise_random", "--simi_lambda", -2, "--simi_noise", 0.05],
                 "more": ["--simi_penalty", "none"]}
    runner.say(f"== Gaussian LM: Diffusion-LM {steps} steps, then post-training and its control ({post_steps})")

    def chain() -> dict:
        base = runner.train("glm", glm_args(paths, steps), prio)
        post, more = runner.parallel([lambda t=t: runner.train(f"glm-{t}", override(glm_args(paths, steps), restart) +
                                                               ["--post_train", base, *continued[t]], prio)
                                      for t in ("post", "more")])
        return {"": base, "post-": post, "more-": more}

    runs, absorbing_dir = runner.parallel([chain, lambda: absorbing_long(runner, paths, sc)])
    n, a_steps = sc["glm_samples"], max(sc["sample_steps"])
    folder = os.path.join(runner.out, "infill")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(paths["lm"], "test.txt"), encoding="utf-8") as f:
        refs = [line for line in f.read().splitlines() if line.strip()][:sc["glm_infill"]]
    templates, references = os.path.join(folder, "templates.txt"), os.path.join(folder, "references.txt")
    write_text_atomic(templates, "".join(t + "\n" for t in make_templates(refs, INFILL_FRACTION, seed=3)))
    write_text_atomic(references, "".join(r + "\n" for r in refs))
    absorbing = (absorbing_dir, ["--steps", a_steps])
    gaussian = (runs[""], ["--decode_respacing", sc["glm_respacings"][0]])

    def length_control(model: str, run_dir: str, flags: list) -> dict:
        """Every sample asks for one of GLM_LENGTHS words; the fraction that has exactly that many."""
        m = sample_and_score(runner, paths, run_dir, f"length-{model}", ["--num_samples", n, "--length",
                                                                         ",".join(map(str, GLM_LENGTHS)), *flags], prio)
        with open(m["samples_file"], encoding="utf-8") as f:
            got = [len(line.split()) for line in f.read().splitlines()]
        return m | {"length_met": statistics.fmean(g == GLM_LENGTHS[i % len(GLM_LENGTHS)] for i, g in enumerate(got))}

    def infill(model: str, run_dir: str, flags: list) -> dict:
        """The held-out test sentences with 30% of their words masked, filled and scored."""
        txt, metric = os.path.join(folder, f"{model}.txt"), os.path.join(folder, f"{model}.metrics.json")
        runner.run(f"infill-{model}", "predict.py", ["--checkpoint", run_dir, "--template_file", templates, *flags,
                                                     "--batch_size", 100, "--seed", 1, "--device", "cpu",
                                                     "--out_dir", folder, "--name", model, "--overwrite"], txt, prio)
        runner.run(f"score-infill-{model}", "compute_metric.py", [
            "--mode", "infill", "--samples", txt, "--templates", templates, "--references", references,
            "--language", paths["language"], "--out", metric, "--overwrite"], metric, prio)
        return read_json(metric)["metrics"] | {"flags": " ".join(map(str, flags))}

    # every evaluation is independent: they share the --jobs slots (sequences/s: one run per core)
    jobs = {("samples", f"glm-{tag}{r}"): lambda d=run_dir, tag=tag, r=r: sample_and_score(
                runner, paths, d, f"glm-{tag}{r}", ["--num_samples", n, "--decode_respacing", r], prio)
            for tag, run_dir in runs.items() for r in sc["glm_respacings"]}
    jobs[("samples", "absorbing")] = lambda: sample_and_score(runner, paths, absorbing_dir,
                                                              f"glm-vs-absorbing-{a_steps}",
                                                              ["--num_samples", n, "--steps", a_steps], prio)
    jobs[("bound", "")] = lambda: elbo(runner, runs[""], "glm", sc)
    for model, (run_dir, flags) in (("absorbing", absorbing), ("gaussian", gaussian)):
        jobs[("length", model)] = lambda m=model, d=run_dir, fl=flags: length_control(m, d, fl)
    for model, (run_dir, flags) in (("absorbing", absorbing), ("gaussian", gaussian),
                                    ("gaussian-post", (runs["post-"], ["--decode_respacing",
                                                                        sc["glm_respacings"][-1]]))):
        jobs[("infill", model)] = lambda m=model, d=run_dir, fl=flags: infill(m, d, fl)
    done = dict(zip(jobs, runner.parallel(list(jobs.values()))))
    samples, length, infills = ({k: v for (kind, k), v in done.items() if kind == want}
                                for want in ("samples", "length", "infill"))
    from textdata.synthetic import SyntheticLanguage, score
    lang = SyntheticLanguage.load(paths["language"])
    truth = {"entropy": lang.entropy()["per_token"], "test": score(lang, refs)["nll_per_token"]}
    return {"truth": truth, "runs": runs, "absorbing_dir": absorbing_dir, "samples": samples,
            "bound": done[("bound", "")], "length": length, "infill": infills, "train_seconds": {"gaussian": train_seconds(runs[""]),
                                                "absorbing": train_seconds(absorbing_dir)},
            "absorbing_steps": a_steps}


def override(args: list, values: dict) -> list:
    """``args`` with the value after each flag in ``values`` replaced."""
    args = list(args)
    for flag, value in values.items():
        args[args.index(flag) + 1] = value
    return args


# --------------------------------------------------------------------------- report


def report(out: str, scale: str, sc: dict, lm: dict | None, bible: dict | None, s2s: dict | None, seconds: float,
           glm: dict | None = None) -> str:
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
        long = lm["long"]
        long_steps, long_batch = lm["long_steps"]
        b_mean, b_se = long["nelbo_per_token"], long["nelbo_per_token_se"]
        every = {f"{v}, seed {s}": b for (v, s), b in lm["bounds"].items()} | {"base, long": long}
        below = [k for k, b in every.items() if b["nelbo_per_token"] + 2 * b["nelbo_per_token_se"] < test_nll]
        s512 = lm["sweep"][("ours", max(sc["sample_steps"]))]
        lines += ["## 1. Synthetic language: the bound and the samples against the exact answer", "",
                  f"True entropy {h_tok:.4f} nats/token ({t['entropy']['per_sequence']:.3f} per sequence, "
                  f"{t['entropy']['length'] / t['entropy']['mean_length']:.4f} of it the length); exact NLL of the "
                  f"{t['test']['sequences']} test sequences {test_nll:.4f} ± {test_se:.4f} nats/token. The model is "
                  f"DiffusionBERT as released (spindle, TAD, the released loss weighting), {long_steps} steps at "
                  f"batch {long_batch}, from scratch on the word-level tokenizer.", "",
                  "| model | test NLL (bound), nats/token (K = %d) | ± s.e. | / true entropy |" % sc["elbo_steps"],
                  "|---|---|---|---|",
                  f"| the true language | {test_nll:.4f} | {test_se:.4f} | {test_nll / h_tok:.3f}x |",
                  f"| unigram (add-one, training counts) | {lm['baselines']['unigram']:.4f} | | "
                  f"{lm['baselines']['unigram'] / h_tok:.2f}x |",
                  f"| untrained network (step 0) | {lm['baselines']['untrained']:.4f} | | "
                  f"{lm['baselines']['untrained'] / h_tok:.2f}x |",
                  f"| DiffusionBERT, {long_steps} steps at batch {long_batch} | {b_mean:.4f} | {b_se:.4f} | "
                  f"{b_mean / h_tok:.3f}x |"]
        ok_floor = not below
        ok_close = b_mean <= 1.10 * h_tok
        ok_forbidden = s512["sample_forbidden_fraction"] <= 0.02
        # the exact NLL exists only for samples without a forbidden transition: it says little when many have one
        ok_nll = ok_forbidden and abs(s512.get("sample_nll_per_token", math.inf) / test_nll - 1) <= 0.10
        lines += ["", "Targets:",
                  f"- never below the truth beyond 2 s.e. (all {len(every)} trained models): "
                  f"**{'holds' if ok_floor else 'FAILS: a bug (' + ', '.join(below) + ')'}**",
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
                  f"test NLL bound (nats/token; the truth is {h_tok:.4f}), mean ± std over seeds. A direction "
                  "holds when the variant's bound is higher than the base's by more than twice the larger seed "
                  "std, or when every seed of one is worse than every seed of the other.", "",
                  "| variant | test NLL bound | vs base | the paper's direction | at this scale |", "|---|---|---|---|---|"]
        base_vals = [lm["bounds"][("base", s)]["nelbo_per_token"] for s in seeds]
        verdicts = {}
        for v in lm["variants"]:
            vals = [lm["bounds"][(v, s)]["nelbo_per_token"] for s in seeds]
            diff = statistics.fmean(vals) - statistics.fmean(base_vals)
            verdicts[v] = "" if v == "base" else direction(
                diff, max(mean_std(vals)[1], mean_std(base_vals)[1]), len(seeds), PAPER_DIRECTION[v].startswith("worse"),
                apart(vals, base_vals))
            lines.append(f"| {VARIANT_LABELS[v]} | {fmt_ms(vals)} | {diff:+.3f} | {PAPER_DIRECTION[v]} | "
                         f"{verdicts[v]} |")
        summary["ablations"] = verdicts
        lines += [""]
        series = []
        for v in lm["variants"]:
            steps_ = lm["curves"][v][0][0]
            ys = [statistics.fmean(c[1][i] for c in lm["curves"][v]) for i in range(len(steps_))]
            series.append({"label": VARIANT_LABELS[v], "x": steps_, "y": ys})
        if lm["long_steps"] != (sc["lm_steps"], sc["lm_batch"]):
            series.append({"label": f"{VARIANT_LABELS['base']}, {long_steps} steps at batch {long_batch}",
                           "x": lm["long_curve"][0], "y": lm["long_curve"][1]})
        line_plot(os.path.join(plots, "dev_nelbo.png"), series, "Synthetic language: dev NELBO (no length term)",
                  "optimizer step", "nats/token", hlines=[{"label": "true entropy given the length", "y": h_given}])
        lines += ["![dev NELBO](plots/dev_nelbo.png)", ""]
    if bible:
        lines += ["### Bible LM: pretrained MiniLM against the same network from scratch", "",
                  f"{sc['bible_steps']} steps at batch 16 each; test bound on {sc['bible_eval']} verses (K = 32); "
                  f"seeds {list(sc['bible_seeds'])}, mean ± std.", "",
                  "| initialisation | PPL bound per word | per wordpiece | NELBO nats/wordpiece |", "|---|---|---|---|"]
        nelbo = {}
        for init in ("pretrained", "scratch"):
            vals = [bible["bounds"][(init, s)] for s in sc["bible_seeds"]]
            nelbo[init] = [v["nelbo_per_token"] for v in vals]
            lines.append(f"| {init} | {fmt_ms([v['ppl_word'] for v in vals], 1)} | "
                         f"{fmt_ms([v['ppl_token'] for v in vals], 1)} | {fmt_ms(nelbo[init])} |")
        diff = statistics.fmean(nelbo["scratch"]) - statistics.fmean(nelbo["pretrained"])
        verdict = direction(diff, max(mean_std(nelbo["scratch"])[1], mean_std(nelbo["pretrained"])[1]),
                            len(sc["bible_seeds"]), True, apart(nelbo["scratch"], nelbo["pretrained"]))
        lines += ["", f"- From scratch against pretrained (the paper: pretraining helps), NELBO {diff:+.3f} "
                      f"nats/wordpiece: **{verdict}**", ""]
        summary["bible"] = {"scratch_minus_pretrained_nelbo": diff, "verdict": verdict}
    if s2s:
        lines += seq2seq_report(s2s, sc, plots, summary)
    if glm:
        lines += glm_report(glm, sc, summary)
    write_json_atomic(os.path.join(out, "results.json"), json.loads(json.dumps(summary, default=str)))
    text = "\n".join(lines) + "\n"
    write_text_atomic(os.path.join(out, "results.md"), text)
    return text


def seq2seq_report(s2s: dict, sc: dict, plots: str, summary: dict) -> list[str]:
    """Section 3: the table, the targets, and Tang et al.'s claims judged on exact match."""
    from evaluation.plots import line_plot
    rows, copy, pairs = s2s["rows"], s2s["copy_source"], s2s["pairs"]
    lines = ["## 3. Synthetic seq2seq: reverse the source and map each word", "",
             f"Copying the source scores exact match {copy['exact_match']:.3f}, BLEU {copy['bleu']:.4f}. "
             f"DiffuSeq: {sc['s2s_steps']} steps; `post`: {sc['s2s_post_steps']} more steps of Tang et al.'s "
             f"post-training (the released l2_noise_random penalty, weight 1) from its EMA weights; `more`: the "
             "control, the same restart and steps with DiffuSeq's own loss and no penalty. One sample per source "
             "(no MBR).", "",
             "| model / decoding | test pairs | exact match | token accuracy | BLEU | network calls per sequence | wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {pairs.get(name, '')} | {r['exact_match']:.3f} | {r['token_accuracy']:.3f} | "
                     f"{r['bleu']:.4f} | {r['calls_per_sequence']:.0f} | {r['wall_seconds']:.1f} |")
    a = rows.get("absorbing", {})
    g_name = "diffuseq-" + sc["respacings"][0]  # the full chain where the scale decodes it
    g = rows.get(g_name, {})
    lines += ["", "Targets (at least 90% exact match and BLEU 0.95):",
              f"- conditional DiffusionBERT: **{'holds' if a.get('exact_match', 0) >= 0.9 and a.get('bleu', 0) >= 0.95 else 'not reached'}**",
              f"- DiffuSeq ({sc['respacings'][0]}): **{'holds' if g.get('exact_match', 0) >= 0.9 and g.get('bleu', 0) >= 0.95 else 'not reached'}**",
              "", "Tang et al.'s claims, on exact match (a difference counts when it is larger than twice its "
              "binomial standard error):"]

    def versus(x: str, y: str) -> tuple[float, str] | None:
        if x not in rows or y not in rows:
            return None
        px, py = rows[x]["exact_match"], rows[y]["exact_match"]
        se = math.sqrt(px * (1 - px) / pairs[x] + py * (1 - py) / pairs[y])
        d = px - py
        word = "same" if abs(d) <= 2 * se else ("higher" if d > 0 else "lower")
        return d, f"{x} {px:.3f} vs {y} {py:.3f}: {d:+.3f} ± {se:.3f}, {word}"

    claims = []
    for tag, when in (("", "before post-training"), ("post-", "after post-training")):
        full = f"diffuseq-{tag}full"
        claims += [(f"adp_20 matches the full chain ({when})", f"diffuseq-{tag}adp_20", full, "not lower"),
                   (f"adp_4 matches the full chain ({when})", f"diffuseq-{tag}adp_4", full, "not lower"),
                   (f"adp_20 is at least as good as uniform_20 ({when})", f"diffuseq-{tag}adp_20",
                    f"diffuseq-{tag}uniform_20", "not lower")]
    few = [r for r in sc["respacings"] if r != "full"][-1]
    claims += [(f"post-training helps at {few} beyond the same extra training without the penalty",
                f"diffuseq-post-{few}", f"diffuseq-more-{few}", "higher"),
               (f"post-training helps at {few} (against the model it started from)", f"diffuseq-post-{few}",
                f"diffuseq-{few}", "higher")]
    judged = {}
    for text, x, y, want in claims:
        res = versus(x, y)
        if res is None:
            continue
        word = res[1].rsplit(", ", 1)[1]
        ok = word == "higher" if want == "higher" else word != "lower"
        judged[text] = ok
        lines.append(f"- {text}: **{'holds' if ok else 'does not hold'}** ({res[1]})")
    summary["seq2seq_claims"] = judged
    lines += [""]
    series = []
    for tag, prefix in (("before post-training", "diffuseq-"), ("after post-training", "diffuseq-post-"),
                        ("control: more training, no penalty", "diffuseq-more-")):
        pts = sorted((rows[prefix + r]["calls_per_sequence"], rows[prefix + r]["exact_match"]) for r in sc["respacings"]
                     if prefix + r in rows)
        series.append({"label": tag, "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
    line_plot(os.path.join(plots, "seq2seq_steps.png"), series, "DiffuSeq on reverse-and-map: exact match",
              "decoding steps (network calls per sequence)", "exact match", logx=True)
    lines += ["![seq2seq quality against steps](plots/seq2seq_steps.png)", ""]
    summary["seq2seq"] = {k: {m: r[m] for m in ("exact_match", "token_accuracy", "bleu", "calls_per_sequence",
                                                "wall_seconds")} | {"pairs": pairs.get(k)} for k, r in rows.items()}
    return lines


def glm_report(g: dict, sc: dict, summary: dict) -> list[str]:
    """Section 4: Diffusion-LM against DiffusionBERT, adaptive decay and post-training, infilling and length."""
    smp, secs, a_steps = g["samples"], g["train_seconds"], g["absorbing_steps"]
    long_steps, long_batch = sc["lm_long"]
    h = g["truth"]["entropy"]

    def q(m: dict) -> str:
        return (f"{m.get('sample_nll_per_token', math.nan):.4f} | {100 * m['sample_forbidden_fraction']:.1f}% | "
                f"{m['sequences_per_second']:.1f}")
    lines = ["## 4. Gaussian LM (Diffusion-LM) against DiffusionBERT; infilling and length control", "",
             f"Diffusion-LM as `glm_args` sets it (sqrt schedule, T = {GLM_T}, embedding 16, x0 prediction with the "
             f"rounding loss, a transformer from scratch of hidden 128 and 3 layers) trained for {sc['glm_steps']} "
             f"steps at batch 128 in {secs['gaussian']:.0f} s; DiffusionBERT (part 1's base model) for {long_steps} "
             f"steps at batch {long_batch} in {secs['absorbing']:.0f} s, on the same data and cores. {sc['glm_samples']} "
             f"samples each (seed 1); the true entropy is {h:.4f} nats/token. Sample NLL: the exact NLL per token of "
             "the samples that have a likelihood; forbidden: the fraction with a transition the language never makes.",
             "", "| model | decoding | test NLL bound, nats/token | sample NLL/token | forbidden | sequences/s |",
             "|---|---|---|---|---|---|",
             f"| DiffusionBERT | {a_steps} steps | (part 1) | {q(smp['absorbing'])} |"]
    bound = g["bound"]
    for r in sc["glm_respacings"]:
        b = f"{bound['nelbo_per_token']:.4f} ± {bound['nelbo_per_token_se']:.4f}" if r == sc["glm_respacings"][0] else ""
        lines.append(f"| Diffusion-LM | {r} | {b} | {q(smp['glm-' + r])} |")
    lines += ["", f"Tang et al. on the Gaussian LM: {sc['glm_post_steps']} more steps with the released penalty "
              "(`post`) or without it (`more`, the control), from the EMA weights. Sample NLL / forbidden:", "",
              "| decoding | Diffusion-LM | + post-training | + the same steps, no penalty |", "|---|---|---|---|"]
    for r in sc["glm_respacings"]:
        cells = [f"{smp[f'glm-{t}{r}'].get('sample_nll_per_token', math.nan):.4f} / "
                 f"{100 * smp[f'glm-{t}{r}']['sample_forbidden_fraction']:.1f}%" for t in ("", "post-", "more-")]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    inf = g["infill"]
    ref_nll = next(iter(inf.values())).get("reference_nll_per_token", math.nan)
    lines += ["", f"Infilling: {sc['glm_infill']} held-out test sentences with {INFILL_FRACTION:.0%} of their words "
              f"masked (`make_templates`, seed 3); the originals have NLL {ref_nll:.4f} nats/token. Slot accuracy is "
              "exact-word accuracy against the original; several words can fit a slot, so the exact NLL of the "
              "filled sentence is the fairer score.", "",
              "| model | decoding | given words kept | slot accuracy | filled NLL/token | forbidden |",
              "|---|---|---|---|---|---|"]
    for model, m in inf.items():
        lines.append(f"| {model} | {m['flags']} | {100 * m['given_kept']:.1f}% | {m['slot_accuracy']:.3f} | "
                     f"{m.get('fill_nll_per_token', math.nan):.4f} | {100 * m['fill_forbidden_fraction']:.1f}% |")
    lines += ["", f"Length control: `--length {','.join(map(str, GLM_LENGTHS))}` (sample i asks for the i-th, cycled).",
              "", "| model | length met | sample NLL/token | forbidden |", "|---|---|---|---|"]
    for model, m in g["length"].items():
        lines.append(f"| {model} | {100 * m['length_met']:.1f}% | {m.get('sample_nll_per_token', math.nan):.4f} | "
                     f"{100 * m['sample_forbidden_fraction']:.1f}% |")
    lines += [""]
    summary["gaussian_lm"] = {"train_seconds": secs, "bound": bound.get("nelbo_per_token"),
                              "samples": {k: {m: v.get(m) for m in ("sample_nll_per_token", "sample_forbidden_fraction",
                                                                    "sequences_per_second")} for k, v in smp.items()},
                              "infill": inf, "length_met": {k: v["length_met"] for k, v in g["length"].items()}}
    return lines


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--out", default=None, help="results folder (default: results/reproduce-<time>); an existing "
                                               "one continues where it stopped")
    p.add_argument("--parts", default=None,
                   help="comma-separated: lm, bible, seq2seq, glm (the Gaussian LM, infilling and length control); "
                        "default: lm, bible, seq2seq (glm only when named; smoke: all)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="runs side by side (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    parts = set((args.parts or ",".join(DEFAULT_PARTS.get(args.scale, PARTS))).split(","))
    if not parts <= set(PARTS):
        raise UserError(f"--parts takes {', '.join(PARTS)}, got {args.parts}")
    if args.jobs < 1 or args.threads < 1:
        raise UserError("--jobs and --threads must be at least 1")
    sc = SCALES[args.scale]
    out = args.out or os.path.join("results", f"reproduce-{args.scale}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    settings = os.path.join(out, "settings.json")
    now = json.loads(json.dumps({"scale": args.scale, **sc}))
    # a folder made before a setting existed (a part added since) is continued; a changed setting is refused
    if os.path.exists(settings) and any(now.get(k) != v for k, v in read_json(settings).items()):
        raise UserError(f"{out} was made with other settings ({settings}); its steps cannot be reused: give a new --out")
    write_json_atomic(settings, now)
    print(f"reproduce: scale {args.scale}, results in {out}", flush=True)
    runner = Runner(os.path.abspath(out), args.jobs, args.threads)
    start = time.time()
    paths = make_data(runner.out, sc)
    # the parts run side by side; their steps share the --jobs slots (the seq2seq chain first)
    work = {"lm": lambda: synthetic_lm(runner, paths, sc), "bible": lambda: bible_lm(runner, sc),
            "seq2seq": lambda: seq2seq(runner, paths, sc), "glm": lambda: gaussian_lm(runner, paths, sc)}
    chosen = [k for k in PARTS if k in parts]
    try:
        done = dict(zip(chosen, runner.parallel([work[k] for k in chosen])))
    finally:
        runner.bar.close()
    lm, bible, s2s = done.get("lm"), done.get("bible"), done.get("seq2seq")
    text = report(runner.out, args.scale, sc, lm, bible, s2s, time.time() - start, done.get("glm"))
    print("\n" + text)
    print(f"reproduce: wrote {os.path.join(out, 'results.md')} in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
