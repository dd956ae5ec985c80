"""Part 4: the Gaussian LM (Diffusion-LM), trained for about part 1's training time, against part 1's
DiffusionBERT: its test bound, its samples with the full chain and adp_N before and after post-training and
the control, infilling of held-out sentences, and ``--length`` control, for both processes."""
from __future__ import annotations

import os
import statistics

from common.io import write_text_atomic

from .lm import absorbing_long
from .render import num, pct, table
from .runner import (CONTINUED, bound_summary, elbo, override, read_json, restart, sample_and_score, samples_file,
                     train_seconds)
from .spec import Part

PRIORITY = 1

# The Gaussian LM's step budget at full scale: the absorbing model's training time (``lm_long``: 3000 steps
# at batch 128). Side by side on 2 cores, 150 steps at batch 128 took 145 s for the Gaussian LM and 133 s
# for DiffusionBERT (1 thread each), so 3000 x 133 / 145 steps.
GLM_FULL_STEPS = 2750
SETTINGS = {
    "smoke": dict(glm_steps=20, glm_post_steps=10, glm_samples=12, glm_infill=10, glm_respacings=("full", "adp_4")),
    "quick": dict(glm_steps=800, glm_post_steps=100, glm_samples=100, glm_infill=100,
                  glm_respacings=("adp_20", "adp_4")),
    "full": dict(glm_steps=GLM_FULL_STEPS, glm_post_steps=1000, glm_samples=500, glm_infill=300,
                 glm_respacings=("full", "adp_20", "adp_4")),
}
GLM_T = 2000  # Diffusion-LM's T
GLM_LENGTHS = (6, 10, 14, 18)  # --length: words per sample, cycled
INFILL_FRACTION = 0.3


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


def train_chain(runner, paths: dict, sc: dict) -> dict:
    """Diffusion-LM, then its post-training and the control from it: ``{"": base, "post-": .., "more-": ..}``."""
    steps = sc["glm_steps"]
    base = runner.train("glm", glm_args(paths, steps), PRIORITY)
    post, more = runner.parallel([lambda t=t: runner.train(
        f"glm-{t}", override(glm_args(paths, steps), restart(sc["glm_post_steps"])) + ["--post_train", base,
                                                                                      *CONTINUED[t]], PRIORITY)
        for t in ("post", "more")])
    return {"": base, "post-": post, "more-": more}


def write_infill_data(runner, paths: dict, sc: dict) -> tuple[str, str, list[str]]:
    """``glm_infill`` held-out test sentences and their templates with 30% of the words masked (seed 3)."""
    from evaluation.infill import make_templates
    folder = os.path.join(runner.out, "infill")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(paths["lm"], "test.txt"), encoding="utf-8") as f:
        refs = [line for line in f.read().splitlines() if line.strip()][:sc["glm_infill"]]
    templates, references = os.path.join(folder, "templates.txt"), os.path.join(folder, "references.txt")
    write_text_atomic(templates, "".join(t + "\n" for t in make_templates(refs, INFILL_FRACTION, seed=3)))
    write_text_atomic(references, "".join(r + "\n" for r in refs))
    return templates, references, refs


def length_control(runner, paths: dict, sc: dict, model: str, run_dir: str, flags: list) -> dict:
    """Every sample asks for one of GLM_LENGTHS words; the fraction that has exactly that many."""
    name = f"length-{model}"
    m = sample_and_score(runner, paths, run_dir, name, ["--num_samples", sc["glm_samples"], "--length",
                                                        ",".join(map(str, GLM_LENGTHS)), *flags], PRIORITY)
    with open(samples_file(runner, name), encoding="utf-8") as f:
        got = [len(line.split()) for line in f.read().splitlines()]
    return m | {"length_met": statistics.fmean(g == GLM_LENGTHS[i % len(GLM_LENGTHS)] for i, g in enumerate(got))}


def infill(runner, paths: dict, data: tuple, model: str, run_dir: str, flags: list) -> dict:
    """The held-out test sentences with 30% of their words masked, filled and scored."""
    templates, references, _ = data
    folder = os.path.join(runner.out, "infill")
    txt, metric = os.path.join(folder, f"{model}.txt"), os.path.join(folder, f"{model}.metrics.json")
    runner.run(f"infill-{model}", "predict.py", ["--checkpoint", run_dir, "--template_file", templates, *flags,
                                                 "--batch_size", 100, "--seed", 1, "--device", "cpu",
                                                 "--out_dir", folder, "--name", model, "--overwrite"], txt, PRIORITY)
    runner.run(f"score-infill-{model}", "compute_metric.py", [
        "--mode", "infill", "--samples", txt, "--templates", templates, "--references", references,
        "--language", paths["language"], "--out", metric, "--overwrite"], metric, PRIORITY)
    return read_json(metric)["metrics"] | {"flags": " ".join(map(str, flags))}


def evaluations(runner, paths: dict, sc: dict, runs: dict, absorbing_dir: str, data: tuple) -> dict:
    """Every evaluation as data: ``{(kind, name): zero-argument call}``; they are independent and share the
    --jobs slots (sequences/s: one run per core)."""
    n, a_steps = sc["glm_samples"], max(sc["sample_steps"])
    jobs = {("samples", f"glm-{tag}{r}"): lambda d=run_dir, tag=tag, r=r: sample_and_score(
                runner, paths, d, f"glm-{tag}{r}", ["--num_samples", n, "--decode_respacing", r], PRIORITY)
            for tag, run_dir in runs.items() for r in sc["glm_respacings"]}
    jobs[("samples", "absorbing")] = lambda: sample_and_score(runner, paths, absorbing_dir,
                                                              f"glm-vs-absorbing-{a_steps}",
                                                              ["--num_samples", n, "--steps", a_steps], PRIORITY)
    jobs[("bound", "")] = lambda: bound_summary(elbo(runner, runs[""], "glm", sc, priority=PRIORITY))
    absorbing = (absorbing_dir, ["--steps", a_steps])
    gaussian = (runs[""], ["--decode_respacing", sc["glm_respacings"][0]])
    for model, (run_dir, flags) in (("absorbing", absorbing), ("gaussian", gaussian)):
        jobs[("length", model)] = lambda m=model, d=run_dir, fl=flags: length_control(runner, paths, sc, m, d, fl)
    gaussian_post = (runs["post-"], ["--decode_respacing", sc["glm_respacings"][-1]])
    for model, (run_dir, flags) in (("absorbing", absorbing), ("gaussian", gaussian), ("gaussian-post", gaussian_post)):
        jobs[("infill", model)] = lambda m=model, d=run_dir, fl=flags: infill(runner, paths, data, m, d, fl)
    return jobs


def run(runner, paths: dict, sc: dict) -> dict:
    runner.say(f"== Gaussian LM: Diffusion-LM {sc['glm_steps']} steps, then post-training and its control "
               f"({sc['glm_post_steps']})")
    runs, absorbing_dir = runner.parallel([lambda: train_chain(runner, paths, sc),
                                           lambda: absorbing_long(runner, paths, sc)])
    data = write_infill_data(runner, paths, sc)
    jobs = evaluations(runner, paths, sc, runs, absorbing_dir, data)
    done = dict(zip(jobs, runner.parallel(list(jobs.values()))))
    samples, length, infills = ({k: v for (kind, k), v in done.items() if kind == want}
                                for want in ("samples", "length", "infill"))
    from textdata.synthetic import SyntheticLanguage, score
    lang = SyntheticLanguage.load(paths["language"])
    truth = {"entropy": lang.entropy()["per_token"], "test": score(lang, data[2])["nll_per_token"]}
    return {"truth": truth, "samples": samples, "bound": done[("bound", "")], "length": length, "infill": infills,
            "train_seconds": {"gaussian": train_seconds(runs[""]), "absorbing": train_seconds(absorbing_dir)},
            "absorbing_steps": max(sc["sample_steps"])}


# --------------------------------------------------------------------------- the page


def quality(m: dict) -> list[str]:
    return [f"{num(m.get('sample_nll_per_token')):.4f}", pct(m["sample_forbidden_fraction"]),
            f"{m['sequences_per_second']:.1f}"]


def samples_section(g: dict, sc: dict) -> list[str]:
    """Diffusion-LM's bound and samples beside DiffusionBERT's, then Tang et al.'s post-training."""
    smp, secs, bound = g["samples"], g["train_seconds"], g["bound"]
    long_steps, long_batch = sc["lm_long"]
    lines = [f"Diffusion-LM as `glm_args` sets it (sqrt schedule, T = {GLM_T}, embedding 16, x0 prediction with the "
             f"rounding loss, a transformer from scratch of hidden 128 and 3 layers) trained for {sc['glm_steps']} "
             f"steps at batch 128 in {secs['gaussian']:.0f} s; DiffusionBERT (part 1's base model) for {long_steps} "
             f"steps at batch {long_batch} in {secs['absorbing']:.0f} s, on the same data and cores. "
             f"{sc['glm_samples']} samples each (seed 1); the true entropy is {g['truth']['entropy']:.4f} nats/token. "
             "Sample NLL: the exact NLL per token of the samples that have a likelihood; forbidden: the fraction "
             "with a transition the language never makes.", ""]
    rows = [["DiffusionBERT", f"{g['absorbing_steps']} steps", "(part 1)", *quality(smp["absorbing"])]]
    for r in sc["glm_respacings"]:
        b = (f"{bound['nelbo_per_token']:.4f} ± {bound['nelbo_per_token_se']:.4f}"
             if r == sc["glm_respacings"][0] else "")
        rows.append(["Diffusion-LM", r, b, *quality(smp["glm-" + r])])
    lines += table(["model", "decoding", "test NLL bound, nats/token", "sample NLL/token", "forbidden",
                    "sequences/s"], rows)
    lines += ["", f"Tang et al. on the Gaussian LM: {sc['glm_post_steps']} more steps with the released penalty "
              "(`post`) or without it (`more`, the control), from the EMA weights. Sample NLL / forbidden:", ""]
    lines += table(["decoding", "Diffusion-LM", "+ post-training", "+ the same steps, no penalty"], [
        [r, *(f"{num(smp[f'glm-{t}{r}'].get('sample_nll_per_token')):.4f} / "
              f"{pct(smp[f'glm-{t}{r}']['sample_forbidden_fraction'])}" for t in ("", "post-", "more-"))]
        for r in sc["glm_respacings"]])
    return lines + [""]


def infill_section(g: dict, sc: dict) -> list[str]:
    """Infilling and length control, for both processes."""
    inf = g["infill"]
    ref_nll = num(next(iter(inf.values())).get("reference_nll_per_token"))
    lines = [f"Infilling: {sc['glm_infill']} held-out test sentences with {INFILL_FRACTION:.0%} of their words "
             f"masked (`make_templates`, seed 3); the originals have NLL {ref_nll:.4f} nats/token. Slot accuracy is "
             "exact-word accuracy against the original; several words can fit a slot, so the exact NLL of the "
             "filled sentence is the fairer score.", ""]
    lines += table(["model", "decoding", "given words kept", "slot accuracy", "filled NLL/token", "forbidden"], [
        [model, m["flags"], pct(m["given_kept"]), f"{m['slot_accuracy']:.3f}",
         f"{num(m.get('fill_nll_per_token')):.4f}", pct(m["fill_forbidden_fraction"])] for model, m in inf.items()])
    lines += ["", f"Length control: `--length {','.join(map(str, GLM_LENGTHS))}` (sample i asks for the i-th, cycled).",
              ""]
    lines += table(["model", "length met", "sample NLL/token", "forbidden"], [
        [model, pct(m["length_met"]), f"{num(m.get('sample_nll_per_token')):.4f}", pct(m["sample_forbidden_fraction"])]
        for model, m in g["length"].items()])
    return lines + [""]


def render(g: dict, sc: dict, ctx) -> list[str]:
    return samples_section(g, sc) + infill_section(g, sc)


PART = Part(key="glm", title="4. Gaussian LM (Diffusion-LM) against DiffusionBERT; infilling and length control",
            settings=SETTINGS, run=run, render=render, default_scales=("smoke",), priority=PRIORITY)
