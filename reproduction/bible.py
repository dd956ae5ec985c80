"""Part 2b: on the Bible LM, DiffusionBERT from pretrained MiniLM against the same network from scratch, and
MDLM's objective on the pretrained network (issue 22)."""
from __future__ import annotations

import os

from .render import compare, fmt_ms, table
from .runner import bound_summary, read_json
from .spec import Part

PRIORITY = 2

SETTINGS = {"smoke": dict(bible_steps=2, bible_seeds=(0,), bible_eval=8),
            "quick": dict(bible_steps=15, bible_seeds=(0,), bible_eval=32),
            "full": dict(bible_steps=100, bible_seeds=(0, 1, 2), bible_eval=64)}
INITS = ("pretrained", "scratch", "pretrained-mdlm")
# what each run changes in DiffusionBERT as released (spindle, the released loss weighting): its flags come after
# the base's, and argparse keeps the last value of a flag
RUN_FLAGS = {"pretrained": [], "scratch": ["--from_scratch"],
             "pretrained-mdlm": ["--objective", "mdlm", "--schedule", "loglinear", "--loss_weighting", "elbo",
                                 "--low_discrepancy"]}
LABELS = {"pretrained": "pretrained", "scratch": "scratch", "pretrained-mdlm": "pretrained, MDLM's objective"}


def train_and_bound(runner, sc: dict, wf: str, init: str, seed: int) -> dict:
    """One run of ``RUN_FLAGS`` and seed: ``bible_steps`` at batch 16, then its test bound on ``bible_eval`` verses."""
    steps, data = sc["bible_steps"], os.path.join(runner.out, "data", "bible")
    run_dir = runner.train(f"bible-{init}-s{seed}", [
        "--model_name_or_path", "minilm", "--dataset", "bible", "--data_dir", data, "--max_len", 64,
        "--num_steps", 2048, "--schedule", "spindle", "--word_freq_file", wf, "--time_conditioning", "none",
        "--loss_weighting", "released", *RUN_FLAGS[init], "--batch_size", 16, "--lr", "1.5e-4", "--warmup_steps", max(1, steps // 10),
        "--max_steps", steps, "--eval_every", 0, "--eval_examples", 64, "--eval_steps", 8,
        "--save_every", steps, "--log_every", max(1, steps // 10), "--seed", seed, "--device", "cpu"], PRIORITY)
    out = os.path.join(runner.out, "elbo", f"bible-{init}-s{seed}.json")
    runner.run(f"elbo-bible-{init}-s{seed}", "compute_elbo.py", [
        "--checkpoint", run_dir, "--num_examples", sc["bible_eval"], "--eval_steps", 32, "--batch_size", 64,
        "--seed", 42, "--device", "cpu", "--out", out, "--overwrite"], out, PRIORITY)
    return bound_summary(read_json(out))


def run(runner, paths: dict, sc: dict) -> dict:
    wf = os.path.join(runner.out, "word_freq", "minilm__bible.json")
    runner.run("word-freq-bible", "word_freq.py", ["--model_name_or_path", "minilm", "--dataset", "bible",
                                                  "--data_dir", os.path.join(runner.out, "data", "bible"),
                                                  "--out", wf, "--overwrite"], wf, PRIORITY)
    jobs = [(init, s) for init in INITS for s in sc["bible_seeds"]]
    runner.say(f"== Bible LM: {len(jobs)} training runs (pretrained MiniLM / from scratch x seeds "
               f"{list(sc['bible_seeds'])})")
    res = runner.parallel([lambda i=i, s=s: train_and_bound(runner, sc, wf, i, s) for i, s in jobs])
    bounds = {init: {} for init in INITS}
    for (init, seed), bound in zip(jobs, res):
        bounds[init][str(seed)] = bound
    return {"bounds": bounds}


def values(bible: dict, init: str, key: str):
    """``key`` of an initialisation's bound per seed (or the stored summary of a record that did not keep them)."""
    b = bible["bounds"][init]
    return b["summary"][key] if "summary" in b else [x[key] for x in b.values()]


def render(bible: dict, sc: dict, ctx) -> list[str]:
    lines = [f"{sc['bible_steps']} steps at batch 16 each; test bound on {sc['bible_eval']} verses (K = 32); "
             f"seeds {list(sc['bible_seeds'])}, mean ± std.", ""]
    runs = [i for i in INITS if i in bible["bounds"]]  # records before MDLM's run have two
    lines += table(["initialisation", "PPL bound per word", "per wordpiece", "NELBO nats/wordpiece"], [
        [LABELS[init], fmt_ms(values(bible, init, "ppl_word"), 1), fmt_ms(values(bible, init, "ppl_token"), 1),
         fmt_ms(values(bible, init, "nelbo_per_token"))] for init in runs])
    scratch, pretrained = (values(bible, i, "nelbo_per_token") for i in ("scratch", "pretrained"))
    diff, judged = compare(scratch, pretrained, True)
    lines += ["", f"- From scratch against pretrained (the paper: pretraining helps), NELBO {diff:+.3f} "
                  f"nats/wordpiece: **{judged}**"]
    if "pretrained-mdlm" in runs:
        diff, judged = compare(values(bible, "pretrained-mdlm", "nelbo_per_token"), pretrained, False)
        lines += [f"- MDLM's objective against the released loss, both from pretrained MiniLM (MDLM's bound is the "
                  f"continuous-time one, the others K = 32 steps): NELBO {diff:+.3f} nats/wordpiece: **{judged}**"]
    return lines + [""]


PART = Part(key="bible", title="2b. Bible LM: pretrained MiniLM against the same network from scratch, and MDLM",
            settings=SETTINGS, run=run, render=render, default_scales=("smoke", "quick", "full"), priority=PRIORITY)
