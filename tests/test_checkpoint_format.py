"""Checkpoints are Hugging Face directories: safetensors weights under transformers' names, a model card, and
old checkpoints (model.pt, ema.pt) still load. Oracles: transformers' own BertForMaskedLM for the weights of a
TAD checkpoint, the state dict that was saved for the round trips, the values written into run_config for
the model card, the scripts' own --help for the card's commands."""
from __future__ import annotations

import dataclasses
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from common.errors import UserError
from conftest import run_here
from runtime import checkpoint, model_card, weights
from runtime.assemble import build_denoiser, build_gaussian_denoiser, load_for_inference
from runtime.checkpoint import TrainingState
from runtime.config import TrainConfig
from runtime.dist import DistInfo
from runtime.training import EMA

pytestmark = pytest.mark.usefixtures("single_thread")


class StubObjective(nn.Module):
    """What TrainingState needs of an objective."""
    dev_key = "nelbo_per_token"

    def state_dict_extra(self) -> dict:
        return {}

    def load_state_dict_extra(self, state: dict) -> None:
        pass


def absorbing_config(tiny_bert, time_conditioning="none") -> TrainConfig:
    return TrainConfig(model_name_or_path=tiny_bert, time_conditioning=time_conditioning, schedule="mutual",
                       num_steps=64, max_len=32, max_steps=3)


def gaussian_config(tiny_bert) -> TrainConfig:
    return TrainConfig(task="seq2seq", process="gaussian", schedule="sqrt", model_name_or_path=tiny_bert,
                       num_steps=10, emb_dim=8, hidden_size=16, num_layers=1, num_heads=2, max_len=16, max_steps=3,
                       ema_rate=0.5)


def build(cfg: TrainConfig, tok):
    """The run's denoiser and the hf config train.py saves with it (random weights: the tests train them)."""
    if cfg.process == "gaussian":
        net = build_gaussian_denoiser(cfg, len(tok))
        return net, net.config
    from transformers import AutoConfig, AutoModelForMaskedLM
    mlm = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(cfg.model_name_or_path))
    return build_denoiser(cfg, mlm, tok), mlm.config


def train_and_save(tmp_path, cfg: TrainConfig, tok, steps: int = 2):
    """A few AdamW steps (every weight moves, the tied ones together), then TrainingState.save as train.py
    calls it. Returns (ckpt_dir, the TrainingState)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net, hf_config = build(cfg, tok)
        optim = torch.optim.AdamW(net.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
        ema = EMA(net, cfg.ema_rate) if cfg.process == "gaussian" else None
        x0 = torch.randint(1000, 2000, (4, 12))
        t = torch.randint(1, cfg.num_steps, (4,))
        for _ in range(steps):
            if cfg.process == "gaussian":
                loss = (net(net.embed(x0), t) - net.embed(x0)).pow(2).mean()
            else:
                loss = nn.functional.cross_entropy(net(x0, t, torch.ones_like(x0)).flatten(0, 1), x0.flatten())
            optim.zero_grad()
            loss.backward()
            optim.step()
            if ema is not None:
                ema.update()
    state = TrainingState(net.eval(), optim, sched, StubObjective(), ema, step=steps, best=3.5)
    ckpt = str(tmp_path / "run" / "checkpoints" / "best")
    run_config = {"config": dataclasses.asdict(cfg), "derived": {}, "dev": {"nelbo_per_token": 3.5}}
    state.save(ckpt, DistInfo(), run_config, hf_config=hf_config, tokenizer=tok)
    return ckpt, state


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the weights


def test_transformers_loads_a_tad_checkpoint_as_its_masked_lm(tmp_path, tiny_bert, tok):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM
    ckpt, state = train_and_save(tmp_path, absorbing_config(tiny_bert), tok)
    assert not os.path.exists(os.path.join(ckpt, weights.DENOISER))  # TAD: the denoiser is the masked LM
    assert json.load(open(os.path.join(ckpt, "config.json")))["architectures"] == ["BertForMaskedLM"]

    mlm, info = AutoModelForMaskedLM.from_pretrained(ckpt, output_loading_info=True)
    assert type(mlm) is BertForMaskedLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # the decoder was stored once, as the word embeddings, and tying restored it
    assert mlm.cls.predictions.decoder.weight.data_ptr() == mlm.bert.embeddings.word_embeddings.weight.data_ptr()
    assert len(AutoTokenizer.from_pretrained(ckpt)) == len(tok)
    x = torch.randint(1000, 2000, (2, 12))
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    t = torch.tensor([5, 40])
    with torch.no_grad():
        ours, theirs = state.model(x, t, mask), mlm.eval()(input_ids=x, attention_mask=mask).logits
    assert torch.equal(ours, theirs)
    assert same_state(load_for_inference(ckpt, torch.device("cpu")).denoiser.state_dict(), state.model.state_dict())


@pytest.mark.parametrize("kind", ["token", "layerwise", "gaussian"])
def test_checkpoints_round_trip_exactly_through_our_loader(tmp_path, tiny_bert, tok, kind):
    cfg = gaussian_config(tiny_bert) if kind == "gaussian" else absorbing_config(tiny_bert, kind)
    ckpt, state = train_and_save(tmp_path, cfg, tok)
    files = set(os.listdir(ckpt))
    assert weights.DENOISER in files and (weights.DENOISER_EMA in files) == (kind == "gaussian")
    assert (weights.MODEL in files) == (kind != "gaussian") and not files & {"model.pt", "ema.pt"}
    # a gaussian checkpoint claims nothing of transformers: no config.json that AutoModel would try
    assert ("config.json" in files) == (kind != "gaussian")
    task = "seq2seq" if kind == "gaussian" else "lm"
    raw = load_for_inference(ckpt, torch.device("cpu"), task=task, weights="raw").denoiser.state_dict()
    assert same_state(raw, state.model.state_dict())
    if kind == "gaussian":
        ema = load_for_inference(ckpt, torch.device("cpu"), task=task).denoiser.state_dict()
        assert same_state(ema, state.ema.state_dict()) and not same_state(ema, raw)
    else:  # the time conditioning moved in training and is stored beside the masked LM
        extra = {"token": "time_token_ids", "layerwise": "time_proj.0.weight"}[kind]
        assert extra in load_file(os.path.join(ckpt, weights.DENOISER))
        assert not any(k.startswith("time_") for k in load_file(os.path.join(ckpt, weights.MODEL)))


def restored(ckpt: str, cfg: TrainConfig, tok) -> TrainingState:
    """Another network of the same config, with its optimizer and EMA, after ``--resume ckpt``'s restore."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        net, _ = build(cfg, tok)
    optim = torch.optim.AdamW(net.parameters(), lr=1e-2)
    state = TrainingState(net, optim, torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0), StubObjective(),
                          EMA(net, cfg.ema_rate))
    rng = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        state.restore(ckpt, rank=0)  # sets the global RNGs
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.random.set_rng_state(rng[2])
    return state


def test_resume_restores_every_weight_and_loads_the_training_state_as_weights_only(tmp_path, tiny_bert, tok):
    ckpt, state = train_and_save(tmp_path, gaussian_config(tiny_bert), tok)
    other = restored(ckpt, gaussian_config(tiny_bert), tok)
    assert same_state(other.model.state_dict(), state.model.state_dict())
    assert same_state(other.ema.state_dict(), state.ema.state_dict()) and other.ema.updates == 2
    a, b = other.optimizer.state_dict()["state"], state.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and len(a) > 0
    assert all(same_state(a[i], b[i]) for i in a)  # step, exp_avg, exp_avg_sq


# ---- old checkpoints


def make_old(ckpt: str, state: TrainingState) -> None:
    """What the old code wrote: torch.save of the whole state dict (and of the EMA's), no safetensors."""
    for f in os.listdir(ckpt):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(ckpt, f))
    torch.save(state.model.state_dict(), os.path.join(ckpt, "model.pt"))
    if state.ema is not None:
        torch.save(state.ema.state_dict(), os.path.join(ckpt, "ema.pt"))


def test_old_absorbing_checkpoint_loads_with_one_line(tmp_path, tiny_bert, tok, capsys):
    ckpt, state = train_and_save(tmp_path, absorbing_config(tiny_bert, "layerwise"), tok)
    make_old(ckpt, state)
    capsys.readouterr()
    run = load_for_inference(str(tmp_path / "run"), torch.device("cpu"))  # a run directory: resolve() finds it
    assert run.ckpt_dir == ckpt and same_state(run.denoiser.state_dict(), state.model.state_dict())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "old-format checkpoint" in err[0] and ckpt in err[0]


def test_gaussian_checkpoint_is_no_transformers_model_and_old_ones_with_a_config_still_load(tmp_path, tiny_bert,
                                                                                            tok, capsys):
    from transformers import AutoConfig, AutoModel
    cfg = gaussian_config(tiny_bert)
    ckpt, state = train_and_save(tmp_path, cfg, tok)
    for load in (AutoConfig.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises((OSError, ValueError)):
            load(ckpt)
    card = open(os.path.join(ckpt, "README.md"), encoding="utf-8").read()
    assert "library_name: pytorch" in card and "transformers" not in card.split("---")[1]
    # the checkpoints written before had the encoder's BertConfig as config.json: they load as before, silently
    state.model.config.save_pretrained(ckpt)
    capsys.readouterr()
    ema = load_for_inference(ckpt, torch.device("cpu"), task="seq2seq").denoiser.state_dict()
    assert same_state(ema, state.ema.state_dict()) and not capsys.readouterr().err


def test_old_gaussian_checkpoint_resumes_with_one_line(tmp_path, tiny_bert, tok, capsys):
    ckpt, state = train_and_save(tmp_path, gaussian_config(tiny_bert), tok)
    make_old(ckpt, state)
    capsys.readouterr()
    other = restored(ckpt, gaussian_config(tiny_bert), tok)  # model.pt, ema.pt and training_state.pt
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "old-format checkpoint" in err[0]
    assert same_state(other.model.state_dict(), state.model.state_dict())
    assert same_state(other.ema.state_dict(), state.ema.state_dict())


# ---- broken checkpoints: one clear line


def test_corrupt_missing_or_mismatched_weights_give_one_error_line(tmp_path, tiny_bert, tok):
    ckpt, _ = train_and_save(tmp_path, absorbing_config(tiny_bert, "token"), tok)
    cpu = torch.device("cpu")
    path = os.path.join(ckpt, weights.MODEL)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # a half-written file
    with pytest.raises(UserError, match=r"cannot load .*model\.safetensors \(corrupt or incomplete checkpoint\)"):
        load_for_inference(ckpt, cpu)
    proc = run_here("compute_elbo.py", "--checkpoint", ckpt, cwd=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [l for l in proc.stderr.strip().splitlines() if l.startswith("error: ")]
    assert "corrupt or incomplete checkpoint" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    open(path, "wb").write(data)
    os.remove(os.path.join(ckpt, weights.DENOISER))
    with pytest.raises(UserError, match=r"has no denoiser\.safetensors$"):
        load_for_inference(ckpt, cpu)

    other, _ = train_and_save(tmp_path / "other", absorbing_config(tiny_bert, "layerwise"), tok)
    os.replace(os.path.join(other, weights.DENOISER), os.path.join(ckpt, weights.DENOISER))  # layerwise weights
    with pytest.raises(UserError, match="do not fit the stored model config: Missing key.*time_token_ids") as e:
        load_for_inference(ckpt, cpu)
    assert "\n" not in str(e.value)

    for f in os.listdir(ckpt):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(ckpt, f))
    with pytest.raises(UserError, match="neither a checkpoint directory"):
        checkpoint.resolve(ckpt)


# ---- the model card


def test_model_card_names_the_step_the_latest_dev_metrics_and_the_commands(tmp_path, tiny_bert, tok):
    ckpt, _ = train_and_save(tmp_path, absorbing_config(tiny_bert), tok)
    card = open(os.path.join(ckpt, "README.md"), encoding="utf-8").read()
    assert "# DiffusionBERT checkpoint `run/best`, step 2\n" in card  # TrainingState's step
    assert "## Dev metrics (the latest evaluation, at step 2)" in card and "| nelbo_per_token | 3.5 |" in card
    assert "time-agnostic" in card and "| schedule | mutual |" in card and "pipeline_tag: fill-mask" in card
    rel = os.path.relpath(ckpt)  # the commands run where train.py ran; the card prints no absolute path
    assert f"python predict.py --checkpoint {rel}\n" in card
    assert f"python compute_elbo.py --checkpoint {rel}\n" in card
    assert f"AutoModelForMaskedLM.from_pretrained({rel!r})" in card
    assert not absolute_path_in(card, str(tmp_path)) and not absolute_path_in(card, tiny_bert)

    # a last checkpoint saved after the latest evaluation, on a seq2seq folder (what train.py writes)
    cfg = dataclasses.asdict(TrainConfig(task="seq2seq", process="gaussian", dataset="folder", data_files="pairs/",
                                         max_steps=900))
    last = os.path.join("out", "run", "checkpoints", "last")
    card = model_card.render({"config": cfg, "step": 700, "best_dev_loss": 0.25,
                              "latest_dev": {"step": 600, "loss": 0.3125, "mse": 0.123456789}}, last)
    assert "step 700 of 900" in card and "Best dev loss of the run so far: 0.25." in card
    assert "## Dev metrics (the latest evaluation, at step 600)" in card
    assert "| loss | 0.3125 |" in card and "| mse | 0.123457 |" in card
    assert "| dataset | folder |" in card and "| data files | pairs/ |" in card and "DiffuSeq" in card
    assert f"python predict_downstream_condition.py --checkpoint {last} --name run-last\n" in card
    assert "python compute_metric.py --mode seq2seq --samples generation_results/run-last\n" in card


@pytest.mark.slow
def test_the_trained_runs_cards_match_metrics_jsonl_and_the_scripts_flags(lm_run, tmp_path):
    _, _, run, _ = lm_run
    dev = [json.loads(line) for line in open(run / "metrics.jsonl") if '"dev"' in line]
    for name in ("best", "last"):
        ckpt = run / "checkpoints" / name
        info = json.load(open(ckpt / "run_config.json"))
        card = (ckpt / "README.md").read_text(encoding="utf-8")
        latest = [r for r in dev if r["split"] == "dev" and r["step"] <= info["step"]][-1]
        assert f", step {info['step']}\n" in card
        assert f"## Dev metrics (the latest evaluation, at step {latest['step']})" in card
        assert f"| nelbo_per_token | {latest['nelbo_per_token']:.6g} |" in card
    helps = {s: run_here(s, "--help", cwd=str(tmp_path)).stdout
             for s in ("predict.py", "compute_elbo.py", "predict_downstream_condition.py", "compute_metric.py")}
    seq2seq = model_card.render({"config": dataclasses.asdict(TrainConfig(task="seq2seq"))}, "x")
    for line in (card + seq2seq).splitlines():
        if line.startswith("python "):
            script, *args = line.split()[1:]
            assert all(a in helps[script] for a in args if a.startswith("--")), line


def absolute_path_in(text: str, path: str) -> bool:
    """Whether ``path`` (absolute) appears in ``text`` as itself, not as the tail of a relative ``../..`` path."""
    import re
    return re.search(r"(?<![\w.])" + re.escape(path), text) is not None


def card_metadata(**config) -> dict:
    import yaml
    card = model_card.render({"config": dataclasses.asdict(TrainConfig(**config)), "step": 1}, "out/run/checkpoints/best")
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_metadata_names_the_hub_model_its_licence_and_the_data(tmp_path):
    """The Hub's metadata, read back with a YAML parser. The ids and licences are the models' own cards': the
    offline 'minilm' is sentence-transformers/all-MiniLM-L6-v2 (apache-2.0), bert-base-uncased is
    google-bert/bert-base-uncased (apache-2.0); the Bible texts (KJV, WEB) are public domain."""
    demo = card_metadata(model_name_or_path="minilm", dataset="bible")
    assert demo == {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "library_name": "transformers",
                    "pipeline_tag": "fill-mask", "license": "apache-2.0", "datasets": ["bible-kjv-web"],
                    "tags": ["diffusion-language-model", "diffusionbert"]}
    bert = card_metadata(model_name_or_path="bert-base-uncased", dataset="lm1b", time_conditioning="layerwise")
    assert bert["base_model"] == "google-bert/bert-base-uncased" and "pipeline_tag" not in bert
    assert bert["license"] == "unknown" and bert["datasets"] == ["lm1b"]  # LM1B's terms are not known here
    # trained from scratch: no base model, though the vocabulary (and so its licence) is MiniLM's
    for scratch in (card_metadata(from_scratch=True), card_metadata(process="gaussian", task="lm")):
        assert "base_model" not in scratch and scratch["license"] == "apache-2.0"
    assert card_metadata(process="gaussian", task="lm")["library_name"] == "pytorch"
    # a local network and the user's own files: unknown licence, and no absolute path anywhere in the card
    local, data = str(tmp_path / "my-bert"), str(tmp_path / "corpus")
    own = card_metadata(model_name_or_path=local, dataset="text", data_files=data)
    assert "base_model" not in own and own["license"] == "unknown" and own["datasets"] == ["text:corpus"]
    card = model_card.render({"config": dataclasses.asdict(TrainConfig(model_name_or_path=local, dataset="text",
                                                                       data_files=data))},
                             str(tmp_path / "run" / "checkpoints" / "best"))
    assert not absolute_path_in(card, str(tmp_path)) and "check the licence of the network" in card
    assert os.path.relpath(local) in card
