"""The model card: a ``README.md`` in every checkpoint directory, written with it from its run config.

It says what was trained (process, schedule, time conditioning and loss weighting, or the Gaussian
settings: DiffuSeq, or Diffusion-LM for an lm run), on what data, up to which step, the dev metrics of the
latest evaluation, and the commands that sample from and evaluate the checkpoint. Everything comes from
``run_config.json``; nothing is measured here.
"""
from __future__ import annotations

import os

from runtime.config import from_dict

README = "README.md"


def _num(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _table(rows) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _kind(cfg) -> str:
    """What the run trained, by the paper it follows."""
    if cfg.process == "absorbing":
        return "DiffusionBERT"
    return "Diffusion-LM" if cfg.task == "lm" else "DiffuSeq"


def _model_rows(cfg) -> list[tuple[str, str]]:
    if cfg.process == "absorbing":
        tc = {"none": "none (time-agnostic decoding, TAD)", "token": "token (a time token after [CLS])",
              "layerwise": "layerwise (a time embedding added before every encoder layer)"}
        return [("process", f"absorbing diffusion (DiffusionBERT), T = {cfg.num_steps}"),
                ("schedule", cfg.schedule + (f" (lambda {cfg.word_freq_lambda}, {cfg.spindle_form} form)"
                                             if cfg.schedule == "spindle" else "")),
                ("time conditioning", tc.get(cfg.time_conditioning, cfg.time_conditioning)),
                ("loss weighting", f"{cfg.loss_weighting}, hybrid lambda {cfg.hybrid_lambda}"),
                ("network", f"{'randomly initialised ' if cfg.from_scratch else ''}masked LM of "
                            f"{cfg.model_name_or_path}")]
    rows = [("process", f"Gaussian diffusion on word embeddings ({_kind(cfg)}), T = {cfg.num_steps}"),
            ("schedule", cfg.schedule),
            ("network", f"DiffuSeq transformer from scratch: embeddings {cfg.emb_dim}, hidden {cfg.hidden_size}, "
                        f"{cfg.num_layers} layer{'s' * (cfg.num_layers != 1)}, {cfg.num_heads} heads; the tokenizer of "
                        f"{cfg.model_name_or_path}"),
            ("training", f"timestep sampler {cfg.timestep_sampler}, loss average {cfg.loss_average}, "
                         f"EMA rate {cfg.ema_rate}")]
    if cfg.post_train:
        rows.append(("post-training", f"from {cfg.post_train}: penalty {cfg.simi_penalty} (lambda {cfg.simi_lambda}, "
                                      f"noise {cfg.simi_noise}, maps {cfg.simi_maps})"))
    return rows


def _weights_text(cfg, ckpt_dir: str) -> list[str]:
    if cfg.process == "gaussian":
        return ["The weights are `denoiser.safetensors` (the DiffuSeq transformer's own names) and "
                "`denoiser_ema.safetensors` (their EMA, which decoding uses unless `--weights raw`); "
                "this repository's loader rebuilds the network from `run_config.json`."]
    if cfg.time_conditioning == "none":
        return ["The denoiser is the masked LM itself, so transformers loads it as a plain masked LM:", "",
                "```python", "from transformers import AutoModelForMaskedLM, AutoTokenizer",
                f"model = AutoModelForMaskedLM.from_pretrained({ckpt_dir!r})",
                f"tokenizer = AutoTokenizer.from_pretrained({ckpt_dir!r})", "```"]
    return [f"`model.safetensors` is the masked LM (transformers' names); the {cfg.time_conditioning} time "
            "conditioning is in `denoiser.safetensors`. The masked LM alone was not trained to denoise "
            "without it: load the whole denoiser with this repository's scripts."]


def render(run_config: dict, ckpt_dir: str) -> str:
    """The card of the checkpoint ``ckpt_dir`` (the path its commands name) from its ``run_config.json``."""
    cfg = from_dict(run_config.get("config", {}))
    step = run_config.get("step")
    name = os.path.basename(os.path.normpath(ckpt_dir))
    run = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir))))
    kind = _kind(cfg)
    lines = ["---"]
    if cfg.process == "absorbing":
        lines.append("library_name: transformers")
        if cfg.time_conditioning == "none":
            lines.append("pipeline_tag: fill-mask")
    lines += ["tags:", "- diffusion-language-model", f"- {kind.lower()}", "---", "",
              f"# {kind} checkpoint `{run}/{name}`, step {step}", "",
              f"Written by `train.py` at optimizer step {step} of {cfg.max_steps}."]
    key = next((k[len("best_dev_"):] for k in run_config if k.startswith("best_dev_")), None)
    if key is not None:
        lines[-1] += f" Best dev {key} of the run so far: {_num(run_config[f'best_dev_{key}'])}" + (
            " (this checkpoint)." if name == "best" else ".")
    lines += ["", "## Model", "", *_table(_model_rows(cfg)), "", *_weights_text(cfg, ckpt_dir), "",
              "## Data", "", *_table([("task", cfg.task), ("dataset", cfg.dataset),
                                      ("data files", cfg.data_files or "-"),
                                      ("max length", f"{cfg.max_len} wordpieces")]), ""]
    latest = run_config.get("latest_dev") or ({"step": step, **run_config["dev"]} if "dev" in run_config else None)
    if latest:
        metrics = {k: v for k, v in latest.items() if k != "step"}
        lines += [f"## Dev metrics (the latest evaluation, at step {latest['step']})", "",
                  "| metric | value |", "|---|---|", *(f"| {k} | {_num(v)} |" for k, v in metrics.items()), ""]
    else:
        lines += ["## Dev metrics", "", "No evaluation yet.", ""]
    if cfg.task == "lm" and cfg.process == "gaussian":
        steps = min(200, cfg.num_steps)
        use = [f"python predict.py --checkpoint {ckpt_dir} --decode_respacing uniform_{steps}"]
        say = (f"Sample (`--decode_respacing`: `full` walks all T = {cfg.num_steps} steps, `uniform_K` and `adp_K` "
               "K of them; from where train.py ran):")
    elif cfg.task == "lm":
        use = [f"python predict.py --checkpoint {ckpt_dir}", f"python compute_elbo.py --checkpoint {ckpt_dir}"]
        say = "Sample, then bound the perplexity by the negative ELBO (from where train.py ran):"
    else:
        out = f"{run}-{name}"
        use = [f"python predict_downstream_condition.py --checkpoint {ckpt_dir} --name {out}",
               f"python compute_metric.py --mode seq2seq --samples generation_results/{out}"]
        say = "Decode the test split (with MBR), then score the outputs (from where train.py ran):"
    lines += ["## Use", "", say, "", "```", *use, "```", ""]
    return "\n".join(lines)


def write(directory: str, run_config: dict, ckpt_dir: str) -> None:
    """Write the card into ``directory`` (the checkpoint being written; its commands name ``ckpt_dir``)."""
    with open(os.path.join(directory, README), "w", encoding="utf-8") as f:
        f.write(render(run_config, ckpt_dir))
