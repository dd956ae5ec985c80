"""Parts 1 and 2: an absorbing model from scratch on the synthetic language (its bound against the exact
entropy, its samples scored exactly, 8..512 steps) and DiffusionBERT's ablations at equal budgets over seeds."""
from __future__ import annotations

import os
import statistics

from .render import compare, fmt_ms, mean_std, num, pct, plot, table, verdict
from .runner import LM_T, bound_summary, elbo, read_metrics_dev, sample_and_score, train_seconds, word_freqs
from .spec import Part

PRIORITY = 1

SETTINGS = {
    # smoke: every step at a trivial size, to check the pipeline (debugging); its numbers mean nothing
    "smoke": dict(lm_lines=(400, 60, 60), lm_steps=20, lm_batch=16, lm_long=(30, 16), seeds=(0, 1), elbo_steps=4,
                  samples=12, sample_steps=(2, 4), ablations=("mutual", "token")),
    "quick": dict(lm_lines=(8000, 500, 500), lm_steps=800, lm_batch=64, lm_long=(800, 64), seeds=(0,),
                  elbo_steps=64, samples=200, sample_steps=(8, 32, 128, 512), ablations=("mutual", "elbo", "mdlm")),
    "full": dict(lm_lines=(20000, 1000, 1000), lm_steps=1000, lm_batch=64, lm_long=(3000, 128), seeds=(0, 1, 2),
                 elbo_steps=64, samples=500, sample_steps=(8, 16, 32, 64, 128, 256, 512),
                 ablations=("mutual", "layerwise", "token", "elbo", "mdlm")),
}
# A budget is optimizer steps at a fixed batch, the same for every variant of an ablation (``lm_steps`` at
# ``lm_batch``); the base variant is also trained once for longer (``lm_long``: steps, batch) for the targets
# against the exact entropy and the sampling sweep (the ablation's seed-0 base run when it is the same).

# DiffusionBERT as released (the base variant), and one change per ablation
LM_BASE = dict(schedule="spindle", time_conditioning="none", loss_weighting="released", objective="discrete",
               low_discrepancy=False)
# mdlm: MDLM's continuous-time objective as released (log-linear schedule, SUBS, antithetic t, TAD; issue 22)
LM_VARIANTS = {"base": {}, "mutual": {"schedule": "mutual"}, "layerwise": {"time_conditioning": "layerwise"},
               "token": {"time_conditioning": "token"}, "elbo": {"loss_weighting": "elbo"},
               "mdlm": {"objective": "mdlm", "schedule": "loglinear", "loss_weighting": "elbo",
                        "low_discrepancy": True}}
# what DiffusionBERT's paper reports for each change to its model (Table 2 and its ablations, LM1B)
PAPER_DIRECTION = {"base": "", "mutual": "worse (PPL 78.76 vs 63.78)", "layerwise": "worse (77.50 vs 63.78, D3PM)",
                   "token": "worse (its time-embedding ablation)",
                   "elbo": "no claim (the released weighting is a code fact, docs/differences.md)",
                   "mdlm": "better (MDLM, LM1B: <= 27.04 against DiffusionBERT's 63.78, with more training)"}
VARIANT_LABELS = {"base": "spindle + TAD + released loss (DiffusionBERT)", "mutual": "mutual schedule",
                  "layerwise": "layer-wise time embedding",
                  "token": "time as a prefix token (vocabulary + 1000 [unused])",
                  "elbo": "ELBO-weighted loss", "mdlm": "MDLM (continuous time, log-linear, SUBS, antithetic t)"}
SAMPLERS = ("ours", "released")  # the sampling sweep: each at every ``sample_steps``


def lm_args(paths: dict, sc: dict, variant: str, seed: int, wf: dict, steps: int, batch: int) -> list[str]:
    v = {**LM_BASE, **LM_VARIANTS[variant]}
    model = "model_token" if v["time_conditioning"] == "token" else "model"
    return ["--model_name_or_path", paths[model], "--from_scratch", "--dataset", "text", "--data_files", paths["lm"],
            "--max_len", 24, "--num_steps", LM_T, "--schedule", v["schedule"], "--word_freq_file", wf[model],
            "--time_conditioning", v["time_conditioning"], "--loss_weighting", v["loss_weighting"],
            "--objective", v["objective"], *(["--low_discrepancy"] if v["low_discrepancy"] else []),
            "--batch_size", batch, "--lr", "2e-3", "--decay", "cosine", "--warmup_steps", max(1, steps // 20),
            "--max_steps", steps, "--eval_every", max(1, steps // 10), "--eval_examples", 500, "--eval_steps", 32,
            "--save_every", max(1, steps // 5), "--log_every", max(1, steps // 40), "--dropout", 0.0,
            "--seed", seed, "--device", "cpu"]


def separate_long(sc: dict) -> bool:
    """Whether the long budget differs from the ablation's (else the long model is the seed-0 base run)."""
    return tuple(sc["lm_long"]) != (sc["lm_steps"], sc["lm_batch"])


def long_run_name(sc: dict) -> str:
    """Part 1's base model at the long budget: a run of its own, or the ablation's seed-0 base run when the
    budgets are the same (``run`` trains it; ``absorbing_long`` must find the same run)."""
    seed = sc["seeds"][0]
    return f"lm-base-long-s{seed}" if separate_long(sc) else f"lm-base-s{seed}"


def absorbing_long(runner, paths: dict, sc: dict) -> str:
    """The run directory of DiffusionBERT's base variant at the long budget (part 1 trains it; a part that
    needs it first waits for it or trains it)."""
    return runner.train(long_run_name(sc), lm_args(paths, sc, "base", sc["seeds"][0],
                                                   word_freqs(runner, paths, PRIORITY), *sc["lm_long"]), PRIORITY)


def train_all(runner, paths: dict, sc: dict, wf: dict) -> tuple[dict, tuple[str, dict]]:
    """Every variant x seed at the ablation's budget, and the base at the long budget (bounded beside the
    untrained network and a unigram model): ``({(variant, seed): (run_dir, bound)}, (long_dir, long_bound))``."""
    variants = ["base", *sc["ablations"]]
    jobs = [(v, s) for v in variants for s in sc["seeds"]]
    long_steps, long_batch = sc["lm_long"]
    separate, first = separate_long(sc), ("base", sc["seeds"][0])

    def train_and_bound(name: str, v: str, s: int, steps: int, batch: int, baselines: bool) -> tuple[str, dict]:
        run_dir = runner.train(name, lm_args(paths, sc, v, s, wf, steps, batch), PRIORITY)
        return run_dir, elbo(runner, run_dir, name, sc, baselines=baselines, priority=PRIORITY)

    calls = [lambda v=v, s=s: train_and_bound(f"lm-{v}-s{s}", v, s, sc["lm_steps"], sc["lm_batch"],
                                              not separate and (v, s) == first) for v, s in jobs]
    if separate:
        calls.insert(0, lambda: train_and_bound(long_run_name(sc), "base", sc["seeds"][0], long_steps, long_batch,
                                                True))
    runner.say(f"== synthetic LM: {len(calls)} training runs ({', '.join(variants)} x seeds {list(sc['seeds'])}"
               f"{'; the base at ' + str(long_steps) + ' steps' if separate else ''})")
    results = runner.parallel(calls)
    ablated = dict(zip(jobs, results[1:] if separate else results))
    return ablated, (results[0] if separate else ablated[first])


def sweep_point(runner, paths: dict, run_dir: str, sc: dict, point: dict) -> dict:
    """One setting of the sampling sweep (``{"sampler", "steps"}``), sampled and scored exactly."""
    sampler, steps = point["sampler"], point["steps"]
    return point | sample_and_score(runner, paths, run_dir, f"lm-base-{sampler}-{steps}", [
        "--num_samples", sc["samples"], "--steps", steps, "--sampler", sampler], PRIORITY)


def run(runner, paths: dict, sc: dict) -> dict:
    from textdata.synthetic import SyntheticLanguage, score
    lang = SyntheticLanguage.load(paths["language"])
    with open(os.path.join(paths["lm"], "test.txt"), encoding="utf-8") as f:
        test_lines = f.read().splitlines()
    truth = {"entropy": lang.entropy(), "test": score(lang, test_lines)}
    ablated, (long_dir, long_bound) = train_all(runner, paths, sc, word_freqs(runner, paths, PRIORITY))
    baselines = {k: b["nll_bound" if k == "untrained" else "nll"] / b["tokens"]
                 for k, b in long_bound["baselines"].items()}
    runner.say("== synthetic LM: sampling sweep")
    # one after another: the sequences/s of the sweep are comparable only without a sampler beside them
    grid = [{"sampler": sampler, "steps": steps} for sampler in SAMPLERS for steps in sc["sample_steps"]]
    sweep = [sweep_point(runner, paths, long_dir, sc, point) for point in grid]
    variants = ["base", *sc["ablations"]]
    by_variant = {v: {str(s): ablated[(v, s)] for s in sc["seeds"]} for v in variants}
    return {"truth": truth, "variants": variants, "baselines": baselines, "sweep": sweep,
            "bounds": {v: {s: bound_summary(r[1]) for s, r in runs.items()} for v, runs in by_variant.items()},
            "curves": {v: {s: read_metrics_dev(r[0]) for s, r in runs.items()} for v, runs in by_variant.items()},
            "train_seconds": {v: {s: train_seconds(r[0]) for s, r in runs.items()} for v, runs in by_variant.items()},
            "long": {"steps": sc["lm_long"][0], "batch": sc["lm_long"][1], "bound": bound_summary(long_bound),
                     "curve": read_metrics_dev(long_dir)}}


# --------------------------------------------------------------------------- the page


def bound_section(lm: dict, sc: dict) -> list[str]:
    """The long model's test bound beside the truth and two baselines."""
    t, long = lm["truth"], lm["long"]
    h_tok, ent = t["entropy"]["per_token"], t["entropy"]
    test_nll, test_se = t["test"]["nll_per_token"], t["test"]["nll_per_token_se"]
    b_mean, b_se = long["bound"]["nelbo_per_token"], long["bound"]["nelbo_per_token_se"]
    base = lm["baselines"]
    return [f"True entropy {h_tok:.4f} nats/token ({ent['per_sequence']:.3f} per sequence, "
            f"{ent['length'] / ent['mean_length']:.4f} of it the length); exact NLL of the {t['test']['sequences']} "
            f"test sequences {test_nll:.4f} ± {test_se:.4f} nats/token. The model is DiffusionBERT as released "
            f"(spindle, TAD, the released loss weighting), {long['steps']} steps at batch {long['batch']}, from "
            "scratch on the word-level tokenizer.", ""] + table(
        ["model", f"test NLL (bound), nats/token (K = {sc['elbo_steps']})", "± s.e.", "/ true entropy"], [
            ["the true language", f"{test_nll:.4f}", f"{test_se:.4f}", f"{test_nll / h_tok:.3f}x"],
            ["unigram (add-one, training counts)", f"{base['unigram']:.4f}", "", f"{base['unigram'] / h_tok:.2f}x"],
            ["untrained network (step 0)", f"{base['untrained']:.4f}", "", f"{base['untrained'] / h_tok:.2f}x"],
            [f"DiffusionBERT, {long['steps']} steps at batch {long['batch']}", f"{b_mean:.4f}", f"{b_se:.4f}",
             f"{b_mean / h_tok:.3f}x"]])


def below_truth(lm: dict, sc: dict) -> tuple[int, list[str]]:
    """How many trained models were bounded, and those whose bound lies below the exact test NLL by more than
    2 s.e. (a bug: a bound cannot beat the truth). A variant's stored summary counts its seeds and how many
    of them were below."""
    test_nll, n_models, below = lm["truth"]["test"]["nll_per_token"], 0, []
    every = {f"{v}, seed {s}": b for v, seeds in lm["bounds"].items() for s, b in seeds.items() if s != "summary"}
    if (lm["long"]["steps"], lm["long"]["batch"]) != (sc["lm_steps"], sc["lm_batch"]):  # else it is base, seed 0
        every["base, long"] = lm["long"]["bound"]
    for v, seeds in lm["bounds"].items():
        if "summary" in seeds:
            n_models += seeds["summary"]["n"]
            below += [f"{v}: {seeds['summary']['below']} seeds"] if seeds["summary"]["below"] else []
    below += [k for k, b in every.items() if b["nelbo_per_token"] + 2 * b["nelbo_per_token_se"] < test_nll]
    return n_models + len(every), below


def targets(lm: dict, sc: dict) -> tuple[list[str], dict]:
    """Part 1's targets against the exact answer, judged: the lines and ``{target: met}``."""
    h_tok, test_nll = lm["truth"]["entropy"]["per_token"], lm["truth"]["test"]["nll_per_token"]
    b_mean = lm["long"]["bound"]["nelbo_per_token"]
    top = max(sc["sample_steps"])
    s512 = next(p for p in lm["sweep"] if (p["sampler"], p["steps"]) == ("ours", top))
    s_nll = num(s512.get("sample_nll_per_token"))
    n_models, below = below_truth(lm, sc)
    met = {"floor": not below, "within_10pct": b_mean <= 1.10 * h_tok,
           "forbidden": s512["sample_forbidden_fraction"] <= 0.02}
    # the exact NLL exists only for samples without a forbidden transition: it says little when many have one
    met["sample_nll"] = met["forbidden"] and abs(s_nll / test_nll - 1) <= 0.10
    return ["Targets:",
            f"- never below the truth beyond 2 s.e. (all {n_models} trained models): "
            f"{verdict(met['floor'], no='FAILS: a bug (' + ', '.join(below) + ')')}",
            f"- bound within 10% of the true entropy: {verdict(met['within_10pct'])} ({b_mean / h_tok:.3f}x)",
            f"- sample NLL within 10% of held-out sequences (ours, {top} steps; counted only when at most 2% of the "
            f"samples break the language): {verdict(met['sample_nll'])} ({s_nll:.4f} on the "
            f"{100 * (1 - s512['sample_invalid_fraction']):.0f}% of samples that have a likelihood, vs {test_nll:.4f})",
            f"- at most 2% of samples with a forbidden transition: {verdict(met['forbidden'])} "
            f"({pct(s512['sample_forbidden_fraction'])})", ""], met


def fewest_steps(lm: dict, sc: dict, sampler: str) -> dict | None:
    """The sweep's first point of ``sampler`` whose quality matches its most-steps point: NLL within 5% and
    forbidden fraction within 5 points."""
    points = [p for p in lm["sweep"] if p["sampler"] == sampler]
    top = next(p for p in points if p["steps"] == max(sc["sample_steps"]))
    ref = num(top.get("sample_nll_per_token"))
    return next((p for p in points if abs(num(p.get("sample_nll_per_token")) / ref - 1) <= 0.05
                 and p["sample_forbidden_fraction"] <= top["sample_forbidden_fraction"] + 0.05), None)


def sweep_section(lm: dict, sc: dict, ctx) -> list[str]:
    """Sample quality and cost against sampling steps, per sampler; its plot."""
    top = max(sc["sample_steps"])
    lines = ["### Sample quality against sampling steps", "",
             "Sample NLL is the exact NLL per token of the samples that have a likelihood; `forbidden` is the "
             f"fraction with a transition the language never makes. A step count matches the {top}-step quality "
             "when its NLL is within 5% and its forbidden fraction within 5 points of it.", ""]
    lines += table(["sampler", "steps", "sample NLL/token", "forbidden", "sequences/s", "network calls"], [
        [p["sampler"], p["steps"], f"{num(p.get('sample_nll_per_token')):.4f}", pct(p["sample_forbidden_fraction"]),
         f"{p['sequences_per_second']:.1f}", p["network_calls"]] for p in lm["sweep"]])
    lines += [""]
    for sampler in dict.fromkeys(p["sampler"] for p in lm["sweep"]):
        best = fewest_steps(lm, sc, sampler)
        if best:
            lines.append(f"- {sampler}: the fewest steps that match its {top}-step quality: **{best['steps']}**, "
                         f"at {best['sequences_per_second']:.1f} sequences/s")
    t = lm["truth"]
    series = [{"label": f"{s} sampler", "x": [p["steps"] for p in lm["sweep"] if p["sampler"] == s],
               "y": [num(p.get("sample_nll_per_token")) for p in lm["sweep"] if p["sampler"] == s]}
              for s in dict.fromkeys(p["sampler"] for p in lm["sweep"])]
    return lines + [""] + plot(ctx, "sample_quality", "sample quality", series,
                               "Synthetic language: exact NLL of the samples", "sampling steps", "nats/token",
                               hlines=[{"label": "held-out sequences", "y": t["test"]["nll_per_token"]},
                                       {"label": "true entropy", "y": t["entropy"]["per_token"]}], logx=True)


def seed_values(lm: dict, v: str):
    """A variant's bound per seed (or the stored summary of a record that did not keep them)."""
    b = lm["bounds"][v]
    return b["summary"] if "summary" in b else [x["nelbo_per_token"] for x in b.values()]


def dev_curves(lm: dict, sc: dict) -> list[dict] | None:
    """The dev NELBO plot's lines: each variant's mean over seeds, and the long run's (None: not kept)."""
    if "curves" not in lm:
        return None
    series = []
    for v in lm["variants"]:
        curves = list(lm["curves"][v].values())
        steps = curves[0]["step"]
        series.append({"label": VARIANT_LABELS[v], "x": steps,
                       "y": [statistics.fmean(num(c["nelbo"][i]) for c in curves) for i in range(len(steps))]})
    long = lm["long"]
    if (long["steps"], long["batch"]) != (sc["lm_steps"], sc["lm_batch"]):
        series.append({"label": f"{VARIANT_LABELS['base']}, {long['steps']} steps at batch {long['batch']}",
                       "x": long["curve"]["step"], "y": [num(y) for y in long["curve"]["nelbo"]]})
    return series


def ablation_section(lm: dict, sc: dict, ctx) -> list[str]:
    """Part 2: each change to DiffusionBERT against the base at equal budgets, judged over seeds."""
    h_tok = lm["truth"]["entropy"]["per_token"]
    lines = ["## 2. DiffusionBERT's ablations on the synthetic language", "",
             f"Equal budgets: {sc['lm_steps']} steps at batch {sc['lm_batch']}; seeds {list(sc['seeds'])}; test NLL "
             f"bound (nats/token; the truth is {h_tok:.4f}), mean ± std over seeds. A direction holds when the "
             "variant's bound is higher than the base's by more than twice the larger seed std, or when every seed "
             "of one is worse than every seed of the other.", ""]
    base, rows = seed_values(lm, "base"), []
    wall = lm.get("train_seconds")  # results written before it was kept have none
    for v in lm["variants"]:
        vals = seed_values(lm, v)
        diff, judged = compare(vals, base, PAPER_DIRECTION[v].startswith("worse"))
        rows.append([VARIANT_LABELS[v], fmt_ms(vals), f"{diff:+.3f}", PAPER_DIRECTION[v],
                     "" if v == "base" else judged] + ([fmt_ms(list(wall[v].values()), 0)] if wall else []))
    lines += table(["variant", "test NLL bound", "vs base", "the paper's direction", "at this scale"]
                   + (["training wall s"] if wall else []), rows) + [""]
    lines += objective_lines(lm, sc)
    h_given = lm["truth"]["entropy"]["per_token_given_length"]
    return lines + plot(ctx, "dev_nelbo", "dev NELBO", dev_curves(lm, sc),
                        "Synthetic language: dev NELBO (no length term)", "optimizer step", "nats/token",
                        hlines=[{"label": "true entropy given the length", "y": h_given}])


def objective_lines(lm: dict, sc: dict) -> list[str]:
    """MDLM's objective against the ELBO-weighted discrete loss (issue 22), when both were run."""
    if not {"mdlm", "elbo"} <= set(lm["variants"]):
        return []
    h_tok = lm["truth"]["entropy"]["per_token"]
    m, e = seed_values(lm, "mdlm"), seed_values(lm, "elbo")
    diff, judged = compare(m, e, False)
    return [f"MDLM against the ELBO-weighted discrete loss (spindle, T = {LM_T}) at the same {sc['lm_steps']} steps: "
            f"{diff:+.3f} nats/token, {judged}. MDLM's bound is the continuous-time one (docs/algorithms.md §1.14), "
            f"the others the {sc['elbo_steps']}-step discrete bound; both bound the NLL, per token, of the same test "
            f"sequences. MDLM ends at {fmt_ms(m)} nats/token, {mean_std(m)[0] / h_tok:.3f}x the true entropy. The "
            "training wall times are of runs side by side on shared cores: a rough guide.", ""]


def render(lm: dict, sc: dict, ctx) -> list[str]:
    return (bound_section(lm, sc) + [""] + targets(lm, sc)[0] + sweep_section(lm, sc, ctx)
            + ablation_section(lm, sc, ctx))


PART = Part(key="lm", title="1. Synthetic language: the bound and the samples against the exact answer",
            settings=SETTINGS, run=run, render=render, default_scales=("smoke", "quick", "full"), priority=PRIORITY)
