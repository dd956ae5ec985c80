"""The parts train.py's loop is built from, each against an oracle of its own: the EMA against its decay
written out by hand, the training-state checkpoint by a round trip that must continue exactly, the data
stream by the uninterrupted stream, the fault hooks and the stop signal by what they are documented to do."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import ROOT
from runtime import checkpoint
from runtime.checkpoint import TrainingState
from runtime.dist import DistInfo
from runtime.faults import Faults
from runtime.training import EMA, ResumableSampler, StopSignals, micro_batches


def two_params(w: float = 1.0, b: float = -1.0) -> nn.Module:
    """A module with two scalar parameters (float64, so that the hand formula is exact enough) and a buffer."""
    m = nn.Module()
    m.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
    m.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))
    m.register_buffer("count", torch.tensor(7))
    return m


def set_params(m: nn.Module, w: float, b: float) -> None:
    with torch.no_grad():
        m.w.fill_(w)
        m.b.fill_(b)


# ---- EMA

def test_ema_follows_the_hand_written_decay():
    m = two_params()
    ema = EMA(m, rate=0.2)
    # decay after n updates is min(rate, (1 + n) / (10 + n)): 1/10, 2/11, then capped at the rate 0.2
    decays = [0.1, 2 / 11, 0.2, 0.2]
    targets = [(2.0, 0.5), (4.0, 0.25), (8.0, -3.0), (16.0, 1.0)]
    ew, eb = 1.0, -1.0
    for d, (w, b) in zip(decays, targets):
        set_params(m, w, b)
        ema.update()
        ew, eb = d * ew + (1 - d) * w, d * eb + (1 - d) * b
        assert ema.params[0].item() == pytest.approx(ew, rel=1e-15, abs=1e-15)
        assert ema.params[1].item() == pytest.approx(eb, rel=1e-15, abs=1e-15)
    assert ema.updates == 4
    assert (m.w.item(), m.b.item()) == (16.0, 1.0)  # update() never touches the model


def test_ema_context_swaps_in_the_averages_and_restores_the_weights_bit_for_bit():
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    ema = EMA(m, rate=0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
    raw = {n: p.detach().clone() for n, p in m.named_parameters()}
    with ema.averaged() as inside:
        assert inside is m
        for p, e in zip(m.parameters(), ema.params):
            assert torch.equal(p, e) and p.data_ptr() != e.data_ptr()
    for n, p in m.named_parameters():
        assert torch.equal(p, raw[n])
    with pytest.raises(RuntimeError, match="boom"), ema.averaged():
        raise RuntimeError("boom")
    for n, p in m.named_parameters():  # restored on the way out of an error too
        assert torch.equal(p, raw[n])


def test_ema_state_dict_keeps_buffers_and_round_trips():
    m = two_params(3.0, 4.0)
    ema = EMA(m, rate=0.5)
    set_params(m, 5.0, 6.0)
    ema.update()
    state = ema.state_dict()
    assert list(state) == list(m.state_dict())  # same keys, same order as model.pt
    # first decay 1/10
    assert state["w"].item() == pytest.approx(0.1 * 3 + 0.9 * 5, rel=1e-15)
    assert state["b"].item() == pytest.approx(0.1 * 4 + 0.9 * 6, rel=1e-15)
    assert state["count"].item() == 7
    w = ema.params[0].item()
    state["w"].add_(1.0)  # a copy: editing it leaves the EMA alone
    assert ema.params[0].item() == w

    other = EMA(two_params(0.0, 0.0), rate=0.5)
    other.load_state_dict(ema.state_dict(), ema.updates)
    for e in (ema, other):
        set_params(e.model, 9.0, 9.0)
        e.update()
    assert other.updates == ema.updates == 2
    assert all(torch.equal(a, b) for a, b in zip(other.params, ema.params))


# ---- the training state

class StubObjective(nn.Module):
    """What TrainingState needs of an objective: a dev key and state of its own."""
    dev_key = "loss"

    def __init__(self):
        super().__init__()
        self.history = torch.zeros(3)

    def state_dict_extra(self) -> dict:
        return {"timestep_sampler": {"history": self.history.clone()}}

    def load_state_dict_extra(self, state: dict) -> None:
        self.history.copy_(state["timestep_sampler"]["history"])


def make_state(seed: int) -> TrainingState:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 / (1 + s))
    return TrainingState(model, optim, sched, StubObjective(), EMA(model, 0.9))


def train_steps(state: TrainingState, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        x = torch.randn(5, 4)  # the global RNG: a resumed run must draw the same numbers
        loss = state.model(x).pow(2).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        state.ema.update()
        state.objective.history += loss.detach()
        state.step += 1
        losses.append(loss.item())
    return losses


def test_training_state_round_trip_continues_exactly(tmp_path):
    a = make_state(0)
    train_steps(a, 3)
    a.epoch, a.position, a.best = 2, 40, 0.5
    ckpt = str(tmp_path / "last")
    a.save(ckpt, DistInfo(), {"config": {"seed": 0}, "dev": {"loss": 0.5}})
    after_a = train_steps(a, 3)

    b = make_state(1)  # other weights, other RNG
    b.restore(ckpt, rank=0)
    assert (b.step, b.epoch, b.position, b.best, b.ema.updates) == (3, 2, 40, 0.5, 3)
    after_b = train_steps(b, 3)
    assert after_b == after_a
    for x, y in [(a.model.state_dict(), b.model.state_dict()), (a.ema.state_dict(), b.ema.state_dict())]:
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert torch.equal(a.objective.history, b.objective.history)
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()

    # the files and keys that train.py has always written (predict.py and --resume read them)
    assert sorted(os.listdir(ckpt)) == ["README.md", "denoiser.safetensors", "denoiser_ema.safetensors",
                                        "run_config.json", "training_state.pt"]
    ts = checkpoint.load_training_state(ckpt)  # weights_only=True
    assert list(ts) == ["optimizer", "scheduler", "step", "epoch", "position", "best", "rng", "ema_updates",
                        "world_size", "timestep_sampler"]
    assert len(ts["rng"]) == 1 and set(ts["rng"][0]) >= {"torch", "python", "numpy"}
    rc = json.load(open(os.path.join(ckpt, "run_config.json")))
    assert rc == {"config": {"seed": 0}, "dev": {"loss": 0.5}, "step": 3, "best_dev_loss": 0.5}


def test_training_state_without_ema_writes_no_ema_file(tmp_path):
    a = make_state(0)
    a.ema = None
    a.save(str(tmp_path / "c"), DistInfo(), {})
    assert "denoiser_ema.safetensors" not in os.listdir(tmp_path / "c")
    assert checkpoint.load_training_state(str(tmp_path / "c"))["ema_updates"] == 0


def test_only_the_main_rank_writes(tmp_path):
    a = make_state(0)
    assert a.save(str(tmp_path / "c"), SimpleNamespace(enabled=False, is_main=False), {}) is None
    assert not os.path.exists(tmp_path / "c")


# ---- the data stream

def test_micro_batches_resume_mid_epoch_as_the_uninterrupted_stream():
    data = [{"input_ids": torch.tensor([i, i])} for i in range(10)]

    def stream(state, n):
        sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=3)
        it = micro_batches(data, sampler, state, batch_size=4, collate_fn=lambda b: {
            "input_ids": torch.stack([x["input_ids"] for x in b])})
        return [next(it)["input_ids"][:, 0].tolist() for _ in range(n)]

    whole = SimpleNamespace(epoch=0, position=0)
    ref = stream(whole, 7)  # 3 batches (4 + 4 + 2) per epoch
    assert [len(b) for b in ref] == [4, 4, 2, 4, 4, 2, 4]
    assert sorted(sum(ref[:3], [])) == list(range(10)) and ref[:3] != ref[3:6]  # reshuffled each epoch
    assert (whole.epoch, whole.position) == (2, 4)
    part = SimpleNamespace(epoch=0, position=0)
    stream(part, 4)
    assert (part.epoch, part.position) == (1, 4)
    assert stream(SimpleNamespace(epoch=1, position=4), 3) == ref[4:]


# ---- fault hooks and signals

def test_fault_hooks_read_the_environment(monkeypatch):
    monkeypatch.setenv("DLM_FAULT_NAN_STEPS", "3, 4")
    monkeypatch.setenv("DLM_FAULT_RAISE_STEP", "6")
    f = Faults.from_env(rank=1)
    out = SimpleNamespace(loss=torch.tensor(2.0))
    for step in (1, 2, 5):
        f.poison_loss(out, step)
        f.before_step(step)
    assert out.loss.item() == 2.0
    f.poison_loss(out, 3)
    assert torch.isnan(out.loss)
    with pytest.raises(RuntimeError, match="DLM_FAULT_RAISE_STEP: injected failure at step 6 on rank 1"):
        f.before_step(6)
    monkeypatch.setenv("DLM_FAULT_RANK", "0")  # another rank's faults
    assert Faults.from_env(rank=1) == Faults(rank=1)
    assert Faults.from_env(rank=0).nan_steps == {3, 4}


def test_crash_in_save_leaves_no_checkpoint(tmp_path):
    code = ("import sys; from runtime import checkpoint; "
            "import torch; checkpoint.save(sys.argv[1], run_config={}, model=torch.nn.Linear(2, 2))")
    env = dict(os.environ, PYTHONPATH=ROOT, DLM_FAULT_CRASH_IN_SAVE="1")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], env=env, timeout=300)
    assert proc.returncode == 99
    assert not os.path.exists(tmp_path / "ckpt")
    (tmp,) = os.listdir(tmp_path)  # the half-written copy: weights and no training state
    assert tmp.startswith("ckpt.tmp-")
    assert sorted(os.listdir(tmp_path / tmp)) == ["denoiser.safetensors", "run_config.json"]


def test_stop_signals_record_the_signal_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals(torch.device("cpu"))
    try:
        assert stop.received(DistInfo()) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received(DistInfo()) == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


# ---- the objectives

def test_objective_is_chosen_by_the_process_and_shares_stats():
    from diffusion import AbsorbingDiffusion, GaussianDiffusion, gaussian_betas, make_schedule
    from runtime.objective import AbsorbingObjective, GaussianObjective, Objective, make_objective

    cfg = SimpleNamespace(timestep_sampler="uniform", num_steps=8, objective="discrete")
    assert type(make_objective(nn.Linear(1, 1), GaussianDiffusion(gaussian_betas("sqrt", 8)), cfg)) is GaussianObjective
    assert type(make_objective(nn.Linear(1, 1), AbsorbingDiffusion(make_schedule("mutual"), 8, mask_id=3), cfg)) \
        is AbsorbingObjective
    # tests/test_ddp_faults.py records the losses by patching Objective.stats: no subclass may override it
    assert all("stats" not in cls.__dict__ for cls in (AbsorbingObjective, GaussianObjective))
    assert Objective.stats is AbsorbingObjective.stats is GaussianObjective.stats
    assert GaussianObjective.keeps_ema and not AbsorbingObjective.keeps_ema
    assert GaussianObjective.format_dev(None, {"loss": 1.23456, "mse": 0.5}) == "dev loss (EMA) 1.2346  mse 0.5000"
    assert AbsorbingObjective.format_dev(None, {"nelbo_per_token": 2.0, "ppl_token": 7.389}) == \
        "dev NELBO/token 2.0000  PPL/token 7.39"


def test_resume_checks_reject_other_settings(tmp_path):
    from common.errors import UserError
    from runtime.config import TrainConfig

    stored = json.loads(json.dumps(TrainConfig().__dict__))
    TrainConfig(max_steps=5, out_dir="elsewhere").check_resume(stored, "ck")  # may change
    with pytest.raises(UserError, match="--lr: checkpoint 5e-05 vs now 0.1"):
        TrainConfig(lr=0.1).check_resume(stored, "ck")
    cfg = TrainConfig(num_layers=3)
    with pytest.raises(UserError, match="is a absorbing checkpoint"):
        cfg.inherit(stored, "ck")
    cfg.inherit({**stored, "process": "gaussian", "num_layers": 3, "hidden_size": 16}, "ck")
    assert (cfg.process, cfg.num_layers, cfg.hidden_size) == ("gaussian", 3, 16)
    with pytest.raises(UserError, match="--num_layers: checkpoint 2 vs now 3"):
        TrainConfig(num_layers=3).inherit({**stored, "process": "gaussian", "num_layers": 2}, "ck")


def test_resume_takes_the_given_flags_and_keeps_the_effective_batch_on_other_process_counts():
    from common.errors import UserError
    from runtime.config import TrainConfig, build_parser, given_flags
    from runtime.rundir import merged_config

    parser = build_parser(TrainConfig)
    assert given_flags(parser, ["--max_steps", "10", "--no-bf16"]) == {"max_steps", "bf16"}
    assert given_flags(parser, ["--max_steps", "10000"]) == {"max_steps"}  # given, though it is the default
    stored = json.loads(json.dumps(TrainConfig(batch_size=4, accumulation_steps=3, schedule="spindle").__dict__))
    lines = []
    cfg = merged_config(TrainConfig(resume="r", max_steps=7, lr=1.0), {"resume", "max_steps"}, stored, "ck",
                        stored_world=2, world=3, log=lines.append)
    # 4 x 3 x 2 = 24 examples per update; on 3 processes 4 x 2 x 3; the lr not given is the stored one
    assert (cfg.batch_size, cfg.accumulation_steps, cfg.max_steps, cfg.lr) == (4, 2, 7, 5e-5)
    assert lines == ["resume: --max_steps 7 (was 10000); 3 processes (was 2): --accumulation_steps 2 (was 3), "
                     "the same effective batch of 24"]
    assert merged_config(TrainConfig(resume="r"), {"resume"}, stored, "ck", 2, 6, lines.append).accumulation_steps == 1
    with pytest.raises(UserError, match=r"cannot keep the effective batch of 24 .* on 4 processes"):
        merged_config(TrainConfig(resume="r"), {"resume"}, stored, "ck", 2, 4, lines.append)
    # an --accumulation_steps that keeps the effective batch is taken; one that changes it is refused
    given = {"resume", "accumulation_steps"}
    assert merged_config(TrainConfig(resume="r", accumulation_steps=2), given, stored, "ck", 2, 3,
                         lines.append).accumulation_steps == 2
    with pytest.raises(UserError, match="--accumulation_steps: checkpoint 3 on 2 processes vs now 5 on 3"):
        merged_config(TrainConfig(resume="r", accumulation_steps=5), given, stored, "ck", 2, 3, lines.append)
    with pytest.raises(UserError, match="--batch_size: checkpoint 4 vs now 8"):
        merged_config(TrainConfig(resume="r", batch_size=8), {"resume", "batch_size"}, stored, "ck", 2, 2, print)
    # a run started with --overwrite (as reproduce.py starts every run) resumes without it; given, it is kept
    started = {**stored, "overwrite": True}
    assert merged_config(TrainConfig(resume="r"), {"resume"}, started, "ck", 2, 2, print).overwrite is False
    assert merged_config(TrainConfig(resume="r", overwrite=True), {"resume", "overwrite"}, started, "ck", 2, 2,
                         print).overwrite is True
