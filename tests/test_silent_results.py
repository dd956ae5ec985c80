"""No silent wrong results (issue 24, part 5): non-finite weights are refused at load, naming the tensor; shape
flags build that shape --from_scratch (and are refused without it, tests/test_bad_flags.py); a small carved
dev/test split is warned about; [UNK]s are counted once per split; --post_train without --simi_penalty uses
Tang et al.'s released penalty; an empty respacing is an error; the default --steps adapts to a small T."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from common.errors import UserError
from tests.bad_flag_inputs import NAN_TENSOR, save_checkpoint, with_nan
from tests.conftest import run_here

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def small_T(tmp_path_factory, tiny_bert, tiny_corpus) -> str:
    """An untrained absorbing lm checkpoint of the tiny corpus with T = 16 (fewer than predict.py's default 128
    steps and compute_elbo.py's default 128 grid steps)."""
    return save_checkpoint(str(tmp_path_factory.mktemp("small_T") / "ckpt"), tiny_bert, num_steps=16, eval_steps=4,
                           dataset="text", data_files=tiny_corpus)


# ---- non-finite weights

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, small_T, value):
    from safetensors.torch import load_file, save_file

    from runtime import api, weights
    from runtime.assemble import load_for_inference
    bad = with_nan(small_T, str(tmp_path / "bad"))
    if value != value:  # nan: with_nan wrote it; inf goes in another tensor
        name = NAN_TENSOR
    else:
        path, name = os.path.join(bad, "model.safetensors"), "bert.embeddings.word_embeddings.weight"
        state = load_file(path)
        state[NAN_TENSOR][0, 0] = 0.0
        state[name][5, 3] = value
        save_file(state, path, metadata={"format": "pt"})
    for load in (lambda: api.load(bad, "cpu"), lambda: load_for_inference(bad, torch.device("cpu"))):
        with pytest.raises(UserError, match=f"weight mlm.{name} .* holds 1 non-finite value"):
            load()
    # the loads of --resume (raw weights) and --post_train (weights.load_into) go through the same check
    net = load_for_inference(small_T, torch.device("cpu")).denoiser
    with pytest.raises(UserError, match=name):
        weights.load_into(bad, net, "raw")


# ---- shape flags build that shape --from_scratch

def test_from_scratch_shape_flags_build_that_masked_lm(tiny_bert):
    from runtime.assemble import initial_network
    from runtime.config import TrainConfig, from_dict
    cfg = TrainConfig(model_name_or_path=tiny_bert, from_scratch=True, hidden_size=24, num_layers=3, num_heads=4,
                      schedule="mutual", num_steps=16, eval_steps=4)
    cfg.check()
    denoiser, _, _, hf_config = initial_network(cfg, log=lambda *a: None)
    state = denoiser.mlm.state_dict()
    # hand-derived from the flags: 3 layers of width 24, feed-forward 4 x 24 = 96, the tokenizer's 30522 rows
    assert state["bert.embeddings.word_embeddings.weight"].shape == (30522, 24)
    assert state["bert.encoder.layer.0.intermediate.dense.weight"].shape == (96, 24)
    assert {k.split(".")[3] for k in state if k.startswith("bert.encoder.layer.")} == {"0", "1", "2"}
    assert (hf_config.num_attention_heads, denoiser.mlm.bert.encoder.layer[0].attention.self.attention_head_size) \
        == (4, 6)
    # stored and read back, the shape rebuilds the same network (--resume, --baselines)
    again = from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert (again.hidden_size, again.num_layers, again.num_heads, again.emb_dim) == (24, 3, 4, None)


def test_a_config_stored_with_the_old_shape_defaults_reads_as_the_pretrained_shape():
    """Absorbing configs once stored the gaussian defaults 128/768/12/12, which their network never used."""
    from runtime.config import TrainConfig, from_dict
    old = {**dataclasses.asdict(TrainConfig()), "emb_dim": 128, "hidden_size": 768, "num_layers": 12, "num_heads": 12}
    cfg = from_dict(old)
    assert (cfg.emb_dim, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (None, None, None, None)
    cfg.check_resume(old, "ck")  # resuming such a run is not a config change
    gauss = from_dict({**old, "process": "gaussian", "schedule": "sqrt", "hidden_size": 16})
    assert (gauss.emb_dim, gauss.hidden_size, gauss.num_layers, gauss.num_heads) == (128, 16, 12, 12)


# ---- a small carved split is warned about

def test_a_carved_split_below_50_lines_is_warned_about(tmp_path, private_hf_cache):
    from textdata.lm import load_text_splits
    for n_lines, carved in ((300, 3), (5100, 51)):  # 1% of the lines is carved off for valid and for test
        path = tmp_path / f"train{n_lines}.txt"
        path.write_text("".join(f"line number {i}\n" for i in range(n_lines)))
        logged = []
        ds = load_text_splits("text", str(path), log=logged.append)
        assert (len(ds["valid"]), len(ds["test"]), len(ds["train"])) == (carved, carved, n_lines - 2 * carved)
        warnings = [m for m in logged if m.startswith("warning:")]
        if carved < 50:
            assert len(warnings) == 2 and all(f"only {carved} lines" in w for w in warnings), logged
            assert "valid split" in warnings[0] and "test split" in warnings[1]
        else:
            assert warnings == [], logged


# ---- [UNK]s are counted, once per split

def test_unknown_characters_are_counted_once_per_split(tok, private_hf_cache):
    from datasets import Dataset

    from conditional_data.pairs import tokenize_pairs
    from textdata.lm import tokenize_splits
    # hand-counted: three emoji words, in two of the three lines; none in valid
    train = ["in the beginning \U0001F600 god", "plain words only", "a \U0001F99C b \U0001F600"]
    logged = []
    tokenize_splits({"train": Dataset.from_dict({"text": train}),
                     "valid": Dataset.from_dict({"text": ["no emoji here"]})}, tok, 32, log=logged.append)
    unk = [m for m in logged if "[UNK]" in m]
    assert len(unk) == 1 and unk[0].startswith("data: train: 3 [UNK] tokens in 2 lines"), logged
    assert "'\U0001F600'" in unk[0] and "'\U0001F99C'" in unk[0]
    # pairs: the target text is what the decoder stores as its references
    logged = []
    tokenize_pairs({"test": Dataset.from_dict({"src": ["a \U0001F600", "b"], "trg": ["c \U0001F99C \U0001F600", "d"]})},
                   tok, 32, log=logged.append)
    unk = [m for m in logged if "[UNK]" in m]
    assert len(unk) == 1 and "3 [UNK] tokens (src: 1 in 1 row; trg: 2 in 1 row)" in unk[0], logged


# ---- --post_train without --simi_penalty

# Tang et al.'s scripts/train.sh (ZetangForward/Bridge_Gap_Diffusion): every post-training command names its
# penalty; the final runs use l2_noise_random, the first of them with these values (transcribed)
RELEASED_POST_TRAIN = {"simi_penalty": "l2_noise_random", "simi_lambda": -2.0, "simi_noise": 0.05}


def test_post_train_without_a_penalty_uses_the_released_one():
    from runtime.config import TrainConfig, build_parser, from_args
    parser = build_parser(TrainConfig)

    def resolved(*argv):
        cfg = from_args(parser.parse_args(["--process", "gaussian", *argv]))
        cfg.check()
        return {k: getattr(cfg, k) for k in RELEASED_POST_TRAIN}

    assert resolved("--post_train", "RUN") == RELEASED_POST_TRAIN
    assert resolved("--post_train", "RUN", "--simi_penalty", "none")["simi_penalty"] == "none"
    assert resolved()["simi_penalty"] == "none"  # DiffuSeq's own training has no penalty
    help_ = " ".join(parser.format_help().split())
    assert "auto: l2_noise_random with --post_train" in help_


# ---- an empty respacing

def test_an_empty_respacing_is_an_error_not_full():
    from diffusion.respacing import parse_respacing
    assert parse_respacing(None, 10) == parse_respacing("full", 10) == list(range(10))
    for spec in ("", "  "):
        with pytest.raises(ValueError, match="respacing is empty"):
            parse_respacing(spec, 10)


# ---- the default number of steps adapts to a small T

def test_the_default_steps_adapt_to_a_checkpoint_with_a_small_T(tmp_path, small_T, tiny_bert, capsys):
    from runtime import api
    big = save_checkpoint(str(tmp_path / "big"), tiny_bert, num_steps=200, eval_steps=4)
    # min(128, T): T = 16 -> 16 with a note, T = 200 -> 128 without one
    assert api.load(small_T, "cpu").decoding().steps == 16
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and note[0].startswith("note: steps defaults to 128") and "T=16" in note[0]
    assert api.load(big, "cpu").decoding().steps == 128 and "note:" not in capsys.readouterr().err
    with pytest.raises(UserError, match="T=16"):  # an explicit number above T is still refused
        api.load(small_T, "cpu").decoding(steps=128)


def test_predict_with_no_flags_on_a_small_T_checkpoint_samples(tmp_path, small_T):
    proc = run_here("predict.py", "--checkpoint", small_T, "--num_samples", "2", "--out_dir", str(tmp_path),
                    cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "note: --steps defaults to 128, more than the checkpoint's T=16" in proc.stderr
    meta = json.loads(next(p for p in tmp_path.iterdir() if p.suffix == ".json").read_text())
    assert meta["steps"] == 16


def test_a_small_absorbing_model_from_scratch_in_one_command(tmp_path, tiny_corpus):
    """The command of docs/troubleshooting.md (with the tiny corpus and a few steps): a 2-layer, width-32
    masked LM with the MiniLM tokenizer, trained and sampled."""
    run = tmp_path / "run"
    proc = run_here("train.py", "--model_name_or_path", "minilm", "--from_scratch", "--hidden_size", "32",
                    "--num_layers", "2", "--num_heads", "2", "--dataset", "text", "--data_files", tiny_corpus,
                    "--schedule", "mutual", "--num_steps", "32", "--eval_steps", "4", "--max_len", "24",
                    "--batch_size", "4", "--max_steps", "2", "--eval_examples", "4", "--warmup_steps", "0",
                    "--out_dir", str(run), "--log_dir", str(tmp_path / "logs"), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(run / "checkpoints" / "best" / "config.json") as f:
        hf = json.load(f)
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["intermediate_size"]) == \
        (32, 2, 2, 128)
    proc = run_here("predict.py", "--checkpoint", str(run), "--num_samples", "2", "--out_dir", str(tmp_path / "g"),
                    cwd=str(tmp_path))
    assert proc.returncode == 0 and "T=32" in proc.stderr, proc.stderr



def test_compute_elbo_with_no_eval_steps_on_a_small_T_checkpoint(tmp_path, small_T):
    out = tmp_path / "elbo.json"
    proc = run_here("compute_elbo.py", "--checkpoint", small_T, "--num_examples", "4", "--out", str(out),
                    cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: --eval_steps defaults to 128, more than the checkpoint's T=16" in proc.stdout
    assert json.loads(out.read_text())["eval_steps"] == 16
