"""DiffuSeq and post-training end to end through the real scripts, on a tiny transformer:
train --process gaussian -> resume -> --post_train -> predict_downstream_condition --decode_respacing
-> compute_metric --mode compare, and the mismatches that must give one error line."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from conftest import ROOT, assert_resume_is_exact, gauss_args, one_error_line, run_cli, run_here, run_together
from released_diffuseq import space_timesteps_adp


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def nltk_m4(ref: str, hyp: str) -> float:
    return sentence_bleu([ref.split()], hyp.split(), smoothing_function=SmoothingFunction().method4)


def diffuseq_mbr_bleu(folder) -> float:
    """DiffuSeq's eval_seq2seq.py on a folder of seed*.jsonl, written out with nltk: strip, drop the
    special tokens, MBR = argmax_i sum_{j != i} bleu([c_i], c_j) (first on ties), then the mean of
    bleu([recover], reference) (its argument order)."""
    files = sorted(f for f in os.listdir(folder) if f.startswith("seed") and f.endswith(".jsonl"))
    seeds = [read_jsonl(os.path.join(folder, f)) for f in files]
    clean = lambda x, pad: x.strip().replace("[SEP]", "").replace("[CLS]", "").replace("[PAD]" if pad else "[CLS]", "")
    scores = []
    for rows in zip(*seeds):
        cands = [clean(r["recover"], True) for r in rows]
        sums = [sum(nltk_m4(c, d) for j, d in enumerate(cands) if j != i) for i, c in enumerate(cands)]
        best = max(range(len(cands)), key=lambda i: (sums[i], -i))
        scores.append(nltk_m4(cands[best], clean(rows[0]["reference"], False)))
    return sum(scores) / len(scores)


@pytest.mark.slow
def test_checkpoint_holds_ema_and_config(gauss_run):
    _, run = gauss_run
    last = run / "checkpoints" / "last"
    cfg = json.load(open(last / "run_config.json"))
    assert cfg["config"]["process"] == "gaussian" and cfg["config"]["schedule"] == "sqrt"
    assert cfg["derived"]["schedule"]["alphabar_0"] < 1
    raw, ema = load_file(last / "denoiser.safetensors"), load_file(last / "denoiser_ema.safetensors")
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the average lags the weights
    ts = torch.load(last / "training_state.pt", weights_only=False)
    assert ts["ema_updates"] == 4 and int(ts["timestep_sampler"]["count"].sum()) == 4 * 8


@pytest.mark.slow
def test_resume_is_exact_with_lossaware_and_ema(tmp_path, tiny_bert, tiny_pairs):
    # T = 4: the lossaware sampler is half warm at the checkpoint (step 4 of 8, 10 losses needed per t)
    run = assert_resume_is_exact(tmp_path, lambda out, n, extra: gauss_args(
        tiny_bert, tiny_pairs, out, max_steps=n, T=4, extra=("--save_every", "4", *extra)))
    ts = torch.load(run / "checkpoints" / "last" / "training_state.pt", weights_only=False)
    assert int(ts["timestep_sampler"]["count"].min()) >= 10  # the sampler was used warm after the resume


@pytest.mark.slow
def test_post_train_decode_and_compare(gauss_run, tiny_bert, tiny_pairs, tmp_path):
    _, run = gauss_run
    cwd = tmp_path
    post = cwd / "post"
    gen = cwd / "gen"
    specs = ("full", "uniform_5", "adp_10")

    def decode(ckpt, tag, spec):
        # each decode its own working directory, hence datasets cache: they run side by side
        (cwd / f"{tag}-{spec}").mkdir()
        return run_cli("predict_downstream_condition.py", "--checkpoint", str(ckpt), "--decode_respacing", spec,
                       "--mbr_size", "2", "--batch_size", "6", "--name", f"{tag}-{spec}", "--out_dir", str(gen),
                       cwd=str(cwd / f"{tag}-{spec}"))

    # model/data flags are inherited from the checkpoint; the base checkpoint decodes meanwhile
    run_together(lambda: run_cli("train.py", "--post_train", str(run), "--simi_penalty", "l2_noise_random",
                                 "--simi_noise", "0.2", "--lr", "1e-4", "--decay", "constant", "--warmup_steps", "0",
                                 "--batch_size", "8", "--max_steps", "2", "--eval_every", "2", "--eval_examples", "8",
                                 "--save_every", "2", "--log_every", "1", "--out_dir", str(post),
                                 "--log_dir", str(cwd / "logs"), cwd=str(cwd)),
                 *(lambda spec=spec: decode(run, "base", spec) for spec in specs))
    cfg = json.load(open(post / "checkpoints" / "last" / "run_config.json"))
    assert cfg["config"]["hidden_size"] == 16 and cfg["derived"]["post_trained_from"].startswith(str(run))
    assert (cfg["config"]["simi_maps"], cfg["config"]["loss_average"], cfg["config"]["simi_lambda"]) == \
        ("released", "all", -2.0)
    rows = [r for r in read_jsonl(post / "metrics.jsonl") if r.get("split") == "train"]
    assert rows and all(r["penalty"] > 0 for r in rows)

    # the post-trained checkpoint at one respacing (the others run the same code on either checkpoint, and base's
    # cover them), in this process: no second interpreter's start-up
    (cwd / "post-adp_10").mkdir()
    assert run_here("predict_downstream_condition.py", "--checkpoint", str(post), "--decode_respacing", "adp_10",
                    "--mbr_size", "2", "--batch_size", "6", "--name", "post-adp_10", "--out_dir", str(gen),
                    cwd=str(cwd / "post-adp_10")).returncode == 0
    info = json.load(open(gen / "post-adp_10" / "decode.json"))
    assert info["process"] == "gaussian" and info["timesteps"] == sorted(space_timesteps_adp(100, 10))
    assert all(t["network_calls"] == 2 * 10 for t in info["timings"])  # 2 batches x 10 steps
    a, b = read_jsonl(gen / "post-adp_10" / "seed42.jsonl"), read_jsonl(gen / "post-adp_10" / "mbr.jsonl")
    n = sum(1 for _ in open(f"{tiny_pairs}/test.jsonl"))
    assert len(a) == len(b) == n and all(set(r) == {"recover", "reference", "source"} for r in b)
    # DiffuSeq's strings: the source keeps [CLS] ... [SEP], the reference ends with its [SEP]
    assert all(r["source"].startswith("[CLS] ") and r["source"].endswith(" [SEP]") for r in a)
    assert all(r["reference"].endswith("[SEP]") and not r["recover"].endswith("[PAD]") for r in a)

    out = cwd / "cmp.json"
    dirs = [*(str(gen / f"base-{s}") for s in specs), str(gen / "post-adp_10")]
    p = run_here("compute_metric.py", "--mode", "compare", "--samples", *dirs, "--bertscore_model", "none",
                 "--out", str(out), cwd=str(cwd))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| post-adp_10 |" in p.stdout
    res = {r["setting"]: r for r in json.load(open(out))["metrics"]["rows"]}
    assert res["base-full"]["calls_per_sequence"] == 100 and res["base-adp_10"]["calls_per_sequence"] == 10
    for name, r in res.items():
        assert r["bleu"] == pytest.approx(diffuseq_mbr_bleu(gen / name), abs=1e-12), name
        assert r["num_sources"] == n


@pytest.mark.slow
def test_torchrun_decoding_matches_one_process_and_repeats(tmp_path, gauss_run, tmp_path_factory):
    """Sharded decoding under torchrun (2 gloo ranks) writes the same files as one process, and the same
    checkpoint, seed and flags give byte-identical files again."""
    cwd, run = gauss_run
    dec = ["--checkpoint", str(run), "--decode_respacing", "uniform_4", "--mbr_size", "2", "--batch_size", "5",
           "--out_dir", str(tmp_path)]
    # the two one-process decodes side by side, each its own working directory (datasets cache)
    run_together(*(lambda name=name: run_cli("predict_downstream_condition.py", *dec, "--name", name,
                                             cwd=str(tmp_path_factory.mktemp(name)))
                   for name in ("one", "again")))
    run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "predict_downstream_condition.py"), *dec, "--name", "two", cwd=str(cwd))
    files = ("seed42.jsonl", "seed43.jsonl", "mbr.jsonl", "copy_source.jsonl")
    for f in files:
        one = (tmp_path / "one" / f).read_bytes()
        assert one and one == (tmp_path / "again" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert json.load(open(tmp_path / "two" / "decode.json"))["ranks"] == 2
    assert sorted(os.listdir(tmp_path / "two")) == sorted((*files, "decode.json", ".lock"))  # common.lock's file


@pytest.mark.slow
def test_mismatches_give_one_error_line(tmp_path, gauss_run, tiny_bert, tiny_pairs):
    cwd, run = gauss_run
    dec = ("predict_downstream_condition.py", "--checkpoint", str(run), "--out_dir", str(tmp_path / "g"))
    # one of each script through a real process (side by side), the rest in this process (conftest.run_here):
    # they stop at a flag or config check
    steps, task = run_together(
        lambda: run_cli(*dec, "--steps", "10", cwd=str(cwd), check=False),
        lambda: run_cli(*gauss_args(tiny_bert, tiny_pairs, tmp_path / "lm", extra=("--task", "lm")), cwd=str(cwd),
                        check=False))
    one_error_line(steps, "--decode_respacing uniform_10")
    one_error_line(run_here(*dec, "--decode_respacing", "adp_500", cwd=str(cwd)), "exceed", "T=100")
    one_error_line(run_here(*dec, "--topk", "5", cwd=str(cwd)), "absorbing")
    one_error_line(run_here(*dec, "--sampler", "released", cwd=str(cwd)), "absorbing")
    one_error_line(run_here("predict.py", "--checkpoint", str(run), cwd=str(cwd)),
                   "seq2seq checkpoint", "predict_downstream_condition.py")
    # a different network than the checkpoint's, and post-training an unknown process
    one_error_line(run_here("train.py", "--post_train", str(run), "--hidden_size", "32", "--out_dir",
                            str(tmp_path / "p"), cwd=str(cwd)), "--hidden_size: checkpoint 16 vs now 32")
    one_error_line(task, "--task lm: unknown --dataset 'folder'")  # a seq2seq folder for the Gaussian LM
    one_error_line(run_here(*gauss_args(tiny_bert, tiny_pairs, tmp_path / "sch", extra=("--schedule", "spindle")),
                            cwd=str(cwd)), "not a gaussian schedule")
    one_error_line(run_here("train.py", "--simi_penalty", "l2_noise_random", "--out_dir", str(tmp_path / "a"),
                            cwd=str(cwd)), "--process gaussian")
    # a positive simi_lambda with the l2 penalty (an error in the released code too)
    one_error_line(run_here("train.py", "--post_train", str(run), "--simi_penalty", "l2_noise_random", "--simi_lambda",
                            "2", "--out_dir", str(tmp_path / "pos"), cwd=str(cwd)),
                   "--simi_lambda must be 0 or negative", "got 2.0")


def test_old_configs_keep_their_behaviour(tmp_path):
    """A config stored before --loss_average/--simi_maps existed loads with what that code did (target-only
    averaging, complete maps); a post-training run of that code (penalty weight 2, MSE target z0) cannot
    be resumed under the released loss."""
    from runtime import checkpoint, rundir
    from runtime.config import TrainConfig, from_dict
    from common.errors import UserError

    old = {k: v for k, v in json.loads(json.dumps(TrainConfig().__dict__)).items()
           if k not in ("loss_average", "simi_maps")}
    cfg = from_dict(old)
    assert (cfg.loss_average, cfg.simi_maps) == ("target", "complete")
    assert (TrainConfig().loss_average, TrainConfig().simi_maps) == ("all", "released")
    assert from_dict({**old, "loss_average": "all"}).loss_average == "all"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({}, ckpt / "model.pt")
    (ckpt / "run_config.json").write_text(json.dumps({"config": {**old, "process": "gaussian",
                                                                  "simi_penalty": "l2_noise_random"}}))
    with pytest.raises(UserError, match="cannot be resumed"):
        rundir.merged_config(TrainConfig(resume=str(ckpt)), {"resume"}, checkpoint.read_run_config(str(ckpt))["config"],
                             str(ckpt), stored_world=1, world=1, log=print)
