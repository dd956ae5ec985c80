"""Part 3: synthetic seq2seq with one right answer (reverse the source, map each word through a fixed
bijection): conditional DiffusionBERT, and DiffuSeq decoded with the full chain and Tang et al.'s respacings,
before and after post-training and after its control."""
from __future__ import annotations

import math
import os

from .render import num, plot, table, verdict
from .runner import CONTINUED, override, read_json, restart
from .spec import Part

PRIORITY = 0  # the longest chain (training, post-training, decoding): never queued behind short runs

# ``s2s_full_decode``: test pairs decoded with DiffuSeq's full chain (2000 calls each); the others ``s2s_decode``
SETTINGS = {
    "smoke": dict(s2s_lines=(300, 20, 20), s2s_steps=20, s2s_post_steps=10, s2s_decode=10, s2s_full_decode=4,
                  respacings=("full", "adp_4")),
    "quick": dict(s2s_lines=(8000, 200, 200), s2s_steps=600, s2s_post_steps=100, s2s_decode=50, s2s_full_decode=0,
                  respacings=("uniform_20", "adp_20", "adp_4")),
    "full": dict(s2s_lines=(20000, 500, 500), s2s_steps=5000, s2s_post_steps=1000, s2s_decode=300,
                 s2s_full_decode=100, respacings=("full", "uniform_20", "adp_20", "adp_10", "adp_4")),
}


def train_args(paths: dict, sc: dict) -> tuple[list, list]:
    """train.py's flags for conditional DiffusionBERT and for DiffuSeq."""
    steps = sc["s2s_steps"]
    common = ["--task", "seq2seq", "--dataset", "folder", "--data_files", paths["s2s"], "--max_len", 48,
              "--batch_size", 64, "--warmup_steps", max(1, steps // 20), "--max_steps", steps,
              "--eval_every", max(1, steps // 5), "--eval_examples", 200, "--save_every", max(1, steps // 5),
              "--log_every", max(1, steps // 40), "--seed", 0, "--device", "cpu"]
    absorbing = ["--model_name_or_path", paths["s2s_model"], "--from_scratch", "--num_steps", 2000,
                 "--schedule", "mutual", "--time_conditioning", "none", "--loss_weighting", "released",
                 "--hybrid_lambda", "3e-4", "--lr", "1e-3", "--eval_steps", 16, "--dropout", 0.0, *common]
    gaussian = ["--process", "gaussian", "--model_name_or_path", paths["s2s_model"], "--num_steps", 2000,
                "--schedule", "sqrt", "--timestep_sampler", "lossaware", "--loss_average", "all",
                "--emb_dim", 64, "--hidden_size", 128, "--num_layers", 3, "--num_heads", 4, "--lr", "1e-3",
                "--ema_rate", 0.999, *common]
    return absorbing, gaussian


def decode(runner, sc: dict, name: str, run_dir: str, flags: list) -> tuple[str, str]:
    """predict_downstream_condition.py on the test sources into ``<out>/decode/<name>``."""
    folder = os.path.join(runner.out, "decode", name)
    pairs = sc["s2s_full_decode"] if "full" in flags else sc["s2s_decode"]
    runner.run(f"decode-{name}", "predict_downstream_condition.py", [
        "--checkpoint", run_dir, "--split", "test", "--num_examples", pairs, "--mbr_size", 1,
        "--batch_size", 100, "--seed", 0, "--device", "cpu", "--out_dir", os.path.join(runner.out, "decode"),
        "--name", name, "--overwrite", *flags], os.path.join(folder, "decode.json"), PRIORITY)
    return name, folder


def train_and_decode(runner, paths: dict, sc: dict) -> dict:
    """Both models trained and decoded (DiffuSeq at every respacing, before and after post-training and the
    control): ``{decoding name: folder}`` in the table's order."""
    absorbing_args, gaussian_args = train_args(paths, sc)

    def respaced(prefix: str, run_dir: str) -> list:
        return runner.parallel([lambda r=r: decode(runner, sc, f"{prefix}-{r}", run_dir, ["--decode_respacing", r])
                                for r in sc["respacings"]])

    def absorbing_chain() -> list:
        run_dir = runner.train("s2s-absorbing", absorbing_args, PRIORITY)
        return [decode(runner, sc, "absorbing", run_dir, ["--steps", 200])]

    def continued_chain(tag: str, gaussian_dir: str) -> list:
        run_dir = runner.train(f"s2s-diffuseq-{tag}", override(gaussian_args, restart(sc["s2s_post_steps"])) + [
            "--post_train", gaussian_dir, *CONTINUED[tag]], PRIORITY)
        return respaced(f"diffuseq-{tag}", run_dir)

    def gaussian_chain() -> list:
        run_dir = runner.train("s2s-diffuseq", gaussian_args, PRIORITY)
        parts = runner.parallel([lambda: respaced("diffuseq", run_dir)] +
                                [lambda t=t: continued_chain(t, run_dir) for t in ("post", "more")])
        return [d for part in parts for d in part]

    runner.say("== seq2seq: conditional DiffusionBERT; DiffuSeq, then its post-training and the control")
    gaussian, absorbing = runner.parallel([gaussian_chain, absorbing_chain])
    return dict(absorbing + gaussian)


def run(runner, paths: dict, sc: dict) -> dict:
    folders = train_and_decode(runner, paths, sc)
    # compare.py compares folders that decode the same sources: the full chain's (fewer) apart
    rows = {}
    for group, names in (("", [n for n in folders if not n.endswith("-full")]),
                         ("-full", [n for n in folders if n.endswith("-full")])):
        if not names:
            continue
        out = os.path.join(runner.out, "decode", f"compare{group}.json")
        runner.run(f"compare-seq2seq{group}", "compute_metric.py", [
            "--mode", "compare", "--samples", *(folders[n] for n in names), "--bertscore_model", "none",
            "--out", out, "--overwrite"], out, PRIORITY)
        rows |= {r["setting"]: r for r in read_json(out)["metrics"]["rows"]}
    rows = {n: rows[n] for n in sorted(rows, key=list(folders).index)}
    copy = os.path.join(runner.out, "decode", "copy_source.metrics.json")
    runner.run("copy-source", "compute_metric.py", ["--mode", "seq2seq", "--samples",
                                                     os.path.join(folders["absorbing"], "copy_source.jsonl"),
                                                     "--bertscore_model", "none", "--out", copy, "--overwrite"],
               copy, PRIORITY)
    pairs = {name: read_json(os.path.join(folder, "decode.json")).get("num_sources")
             for name, folder in folders.items()}
    return {"rows": rows, "copy_source": read_json(copy)["metrics"], "pairs": pairs}


# --------------------------------------------------------------------------- the page


def claims(sc: dict) -> list[tuple[str, str, str, str]]:
    """Tang et al.'s claims as ``(text, decoding x, decoding y, x must be "higher" or "not lower")``."""
    out = []
    for tag, when in (("", "before post-training"), ("post-", "after post-training")):
        full = f"diffuseq-{tag}full"
        out += [(f"adp_20 matches the full chain ({when})", f"diffuseq-{tag}adp_20", full, "not lower"),
                (f"adp_4 matches the full chain ({when})", f"diffuseq-{tag}adp_4", full, "not lower"),
                (f"adp_20 is at least as good as uniform_20 ({when})", f"diffuseq-{tag}adp_20",
                 f"diffuseq-{tag}uniform_20", "not lower")]
    few = [r for r in sc["respacings"] if r != "full"][-1]
    return out + [(f"post-training helps at {few} beyond the same extra training without the penalty",
                   f"diffuseq-post-{few}", f"diffuseq-more-{few}", "higher"),
                  (f"post-training helps at {few} (against the model it started from)", f"diffuseq-post-{few}",
                   f"diffuseq-{few}", "higher")]


def versus(s2s: dict, x: str, y: str) -> tuple[str, str] | None:
    """Decoding ``x`` against ``y`` on exact match: "same", "higher" or "lower" (beyond twice the binomial
    standard error of the difference), and the numbers; None when either is missing."""
    rows, pairs = s2s["rows"], s2s.get("pairs", {})
    if x not in rows or y not in rows or not pairs.get(x) or not pairs.get(y):
        return None
    px, py = rows[x]["exact_match"], rows[y]["exact_match"]
    se = math.sqrt(px * (1 - px) / pairs[x] + py * (1 - py) / pairs[y])
    d = px - py
    word = "same" if abs(d) <= 2 * se else ("higher" if d > 0 else "lower")
    return word, f"{x} {px:.3f} vs {y} {py:.3f}: {d:+.3f} ± {se:.3f}, {word}"


def claim_lines(s2s: dict, sc: dict) -> list[str]:
    lines = []
    for text, x, y, want in claims(sc):
        res = versus(s2s, x, y)
        if res is not None:
            ok = res[0] == "higher" if want == "higher" else res[0] != "lower"
            lines.append(f"- {text}: {verdict(ok, no='does not hold')} ({res[1]})")
    return ["Tang et al.'s claims, on exact match (a difference counts when it is larger than twice its binomial "
            "standard error):", *lines, ""] if lines else []


def render(s2s: dict, sc: dict, ctx) -> list[str]:
    rows, copy, pairs = s2s["rows"], s2s["copy_source"], s2s.get("pairs", {})
    lines = [f"Copying the source scores exact match {copy['exact_match']:.3f}, BLEU {copy['bleu']:.4f}. "
             f"DiffuSeq: {sc['s2s_steps']} steps; `post`: {sc['s2s_post_steps']} more steps of Tang et al.'s "
             f"post-training (the released l2_noise_random penalty, weight 1) from its EMA weights"
             + ("; `more`: the control, the same restart and steps with DiffuSeq's own loss and no penalty"
                if any(n.startswith("diffuseq-more-") for n in rows) else "") + ". One sample per source (no MBR).", ""]
    lines += table(["model / decoding", "test pairs", "exact match", "token accuracy", "BLEU",
                    "network calls per sequence", "wall s"], [
        [name, pairs.get(name) or "", f"{r['exact_match']:.3f}", f"{r['token_accuracy']:.3f}", f"{r['bleu']:.4f}",
         f"{r['calls_per_sequence']:.0f}", f"{r['wall_seconds']:.1f}"] for name, r in rows.items()])

    def met(name: str) -> bool:
        r = rows.get(name, {})
        return r.get("exact_match", 0) >= 0.9 and r.get("bleu", 0) >= 0.95
    first = sc["respacings"][0]  # the full chain where the scale decodes it
    lines += ["", "Targets (at least 90% exact match and BLEU 0.95):",
              f"- conditional DiffusionBERT: {verdict(met('absorbing'))}",
              f"- DiffuSeq ({first}): {verdict(met('diffuseq-' + first))}", ""]
    lines += claim_lines(s2s, sc)
    series = []
    for label, prefix in (("before post-training", "diffuseq-"), ("after post-training", "diffuseq-post-"),
                          ("control: more training, no penalty", "diffuseq-more-")):
        pts = sorted((num(rows[prefix + r]["calls_per_sequence"]), num(rows[prefix + r]["exact_match"]))
                     for r in sc["respacings"] if prefix + r in rows)
        if pts:
            series.append({"label": label, "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
    return lines + plot(ctx, "seq2seq_steps", "seq2seq quality against steps", series,
                        "DiffuSeq on reverse-and-map: exact match", "decoding steps (network calls per sequence)",
                        "exact match", logx=True)


PART = Part(key="seq2seq", title="3. Synthetic seq2seq: reverse the source and map each word", settings=SETTINGS,
            run=run, render=render, default_scales=("smoke", "quick", "full"), priority=PRIORITY)
