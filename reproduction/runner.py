"""The reproduction's plumbing: a ``Runner`` that runs the repository's scripts as steps (reused when their
output exists), the shared data, and the steps that several parts call (a bound, the spindle's token
counts, samples scored on the synthetic language)."""
from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from common.errors import UserError
from common.io import write_text_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LM_T = 1000  # diffusion steps of the synthetic LM (the prefix-token ablation's tokenizer needs as many spares)


class Runner:
    """Runs the repository's scripts as subprocesses, at most ``jobs`` at a time, each with ``threads``
    threads; a step whose ``done`` path exists is skipped.

    Steps may be requested from many threads at once (the parts run side by side); when a slot frees,
    the waiting step with the lowest ``priority`` (then the earliest) takes it, so that the longest chain
    (seq2seq training, post-training, then decoding) is never queued behind the short runs that fill the
    gaps; a freed slot is held a few seconds for a step of the same or a lower priority, so that the next
    step of a chain is not overtaken while it starts. After a failure no new step starts and the running
    ones are stopped (a training run saves and can be resumed)."""

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

    @contextlib.contextmanager
    def slot(self, priority: int = 1):
        """Hold one of the ``jobs`` slots for work done in this process (part 5 samples through the API)."""
        self._acquire(priority)
        try:
            yield
        finally:
            self._release(priority)

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


def finite(x):
    """A float for results.json: None where there is no finite value (JSON has no NaN)."""
    return x if x is None or not isinstance(x, float) or math.isfinite(x) else None


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


# --------------------------------------------------------------------------- steps several parts share


BOUND_KEYS = ("nelbo_per_token", "nelbo_per_token_se", "ppl_token", "ppl_word", "tokens", "words")


def elbo(runner: Runner, run_dir: str, name: str, sc: dict, batch: int = 250, baselines: bool = False,
         priority: int = 1) -> dict:
    """compute_elbo.py on the whole test split (``baselines``: also the untrained network and a unigram model)."""
    out = os.path.join(runner.out, "elbo", f"{name}.json")
    runner.run(f"elbo-{name}", "compute_elbo.py", ["--checkpoint", run_dir, "--num_examples", 0, "--eval_steps",
                                                   sc["elbo_steps"], "--batch_size", batch, "--seed", 0,
                                                   "--device", "cpu", "--out", out, "--overwrite",
                                                   *(["--baselines"] if baselines else [])], out, priority)
    return read_json(out)


def bound_summary(bound: dict) -> dict:
    """The fields of a compute_elbo.py result that the results page reads."""
    return {k: bound[k] for k in BOUND_KEYS if k in bound}


def word_freqs(runner: Runner, paths: dict, priority: int = 1) -> dict:
    """The spindle schedule's token counts for the synthetic tokenizers: ``{model key: word_freq.json}``."""
    wf = {}
    for model, name in (("model", "synthetic"), ("model_token", "synthetic-spare")):
        wf[model] = os.path.join(runner.out, "word_freq", f"{name}.json")
        runner.run(f"word-freq-{name}", "word_freq.py", ["--model_name_or_path", paths[model], "--dataset", "text",
                                                        "--data_files", paths["lm"], "--out", wf[model],
                                                        "--overwrite"], wf[model], priority)
    return wf


def samples_file(runner: Runner, name: str) -> str:
    return os.path.join(runner.out, "samples", f"{name}.txt")


def sample_and_score(runner: Runner, paths: dict, run_dir: str, name: str, flags: list, priority: int) -> dict:
    """``predict.py`` from ``run_dir`` with ``flags`` into ``<out>/samples/<name>.txt`` (``samples_file``),
    scored on the synthetic language (``compute_metric.py --mode synthetic``); with the sampling speed and cost."""
    gen_dir = os.path.join(runner.out, "samples")
    txt = samples_file(runner, name)
    runner.run(f"sample-{name}", "predict.py", ["--checkpoint", run_dir, *flags, "--batch_size", 100, "--seed", 1,
                                                "--device", "cpu", "--out_dir", gen_dir, "--name", name,
                                                "--overwrite"], txt, priority)
    metric = os.path.join(gen_dir, f"{name}.metrics.json")
    runner.run(f"score-{name}", "compute_metric.py", ["--mode", "synthetic", "--samples", txt, "--language",
                                                      paths["language"], "--out", metric, "--overwrite"], metric,
               priority)
    cost = read_json(os.path.join(gen_dir, f"{name}.json"))
    return {**read_json(metric)["metrics"],
            **{k: cost[k] for k in ("sequences_per_second", "network_calls", "wall_seconds")}}


def read_metrics_dev(run_dir: str) -> dict:
    """A run's dev NELBO per token against its optimizer step: ``{"step": [...], "nelbo": [...]}``."""
    from evaluation.plots import read_metrics
    steps, values = read_metrics(os.path.join(run_dir, "metrics.jsonl"), "dev", "nelbo_per_token")
    return {"step": steps, "nelbo": [finite(v) for v in values]}


def train_seconds(run_dir: str) -> float:
    """Wall time of a finished training run, from its log's first and last records."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        times = [json.loads(line)["time"] for line in f if line.strip()]
    return times[-1] - times[0]


def override(args: list, values: dict) -> list:
    """``args`` with the value after each flag in ``values`` replaced."""
    args = list(args)
    for flag, value in values.items():
        args[args.index(flag) + 1] = value
    return args


# Tang et al.'s post-training restarts from the converged model's EMA weights with a fresh optimizer for
# ``post_steps`` steps. "more" is its control: the same restart and steps with the model's own loss and no
# penalty, so that the penalty is not credited with what extra training does.
CONTINUED = {"post": ["--simi_penalty", "l2_noise_random", "--simi_lambda", -2, "--simi_noise", 0.05],
             "more": ["--simi_penalty", "none"]}


def restart(post_steps: int) -> dict:
    """The training flags a post-training run (or its control) overrides."""
    return {"--max_steps": post_steps, "--warmup_steps": 0, "--eval_every": max(1, post_steps // 4),
            "--save_every": max(1, post_steps // 4), "--log_every": max(1, post_steps // 20)}
