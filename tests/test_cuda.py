"""The accelerator paths: the same training step on the CPU and on CUDA, bf16 autocast, fused AdamW,
``--compile`` against eager, checkpoints moving between devices, reproducible sampling, and what
``--compile`` does where its compiler is missing.

Tests marked ``cuda`` need a CUDA device and are skipped without one; ``bash scripts/gpu_check.sh`` runs
them (with the NCCL and bench.py rows) in one call. The CPU versions of the compile and bf16 checks run
everywhere. The network is the tiny one of tests/test_ddp.py (both processes)."""
from __future__ import annotations

import contextlib
import copy
import json
import os

import pytest
import torch

from conftest import gauss_args, one_error_line, run_cli, run_here
from runtime.training import adamw, compile_problem
from test_ddp import make_objective, micro_batch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROCESSES = ["absorbing", "gaussian"]


@contextlib.contextmanager
def cpu_draws():
    """``torch.rand``/``randn``/``randint`` draw from the CPU's global generator (their ``generator`` argument
    ignored) and move the numbers to the requested device, so that a CPU run and a CUDA run of the same
    objective see the same noise and the same t."""
    saved = {n: getattr(torch, n) for n in ("rand", "randn", "randint")}

    def on_cpu(fn):
        def draw(*args, device=None, generator=None, **kw):
            out = fn(*args, **kw)
            return out if device is None else out.to(device)
        return draw

    for n, fn in saved.items():
        setattr(torch, n, on_cpu(fn))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch, n, fn)


def train_step(obj, device, seed: int, bf16: bool = False, optim=None):
    """One step of train.py's loop on ``micro_batch(0)``: the loss under autocast, backward, AdamW.
    Returns (loss, {name: grad}) with the gradients taken before the update."""
    batch = {k: v.to(device) for k, v in micro_batch(0).items()}
    optim = optim or adamw(obj.denoiser.parameters(), 1e-3, 0.01, device)
    optim.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with cpu_draws(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = obj(batch).loss
    loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in obj.denoiser.named_parameters() if p.grad is not None}
    optim.step()
    return float(loss.detach()), grads


@contextlib.contextmanager
def fp32_matmuls():
    """No TF32 on CUDA: the comparison with the CPU is then a float32 one."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("process", PROCESSES)
def test_the_same_training_step_on_cpu_and_cuda_agrees_in_fp32(process):
    cpu_obj = make_objective(process)
    gpu_obj = copy.deepcopy(cpu_obj).cuda()
    with fp32_matmuls():
        loss_c, grads_c = train_step(cpu_obj, torch.device("cpu"), seed=3)
        loss_g, grads_g = train_step(gpu_obj, torch.device("cuda"), seed=3)
    assert loss_c == pytest.approx(loss_g, rel=1e-4)
    assert grads_c.keys() == grads_g.keys() and len(grads_c) > 3
    for n in grads_c:
        torch.testing.assert_close(grads_g[n], grads_c[n], rtol=1e-3, atol=1e-5, msg=n)
    for (n, pc), pg in zip(cpu_obj.denoiser.named_parameters(), gpu_obj.denoiser.parameters()):
        torch.testing.assert_close(pg.detach().cpu(), pc.detach(), rtol=1e-4, atol=1e-5, msg=n)  # after AdamW


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("process", PROCESSES)
def test_bf16_autocast_trains_with_a_finite_loss_on_cuda(process):
    assert torch.cuda.is_bf16_supported()
    check_bf16_training(make_objective(process).cuda(), torch.device("cuda"))


@pytest.mark.cuda
@cuda
def test_fused_adamw_is_taken_on_cuda():
    obj = make_objective("gaussian").cuda()
    optim = adamw(obj.denoiser.parameters(), 1e-3, 0.01, torch.device("cuda"))
    assert all(g["fused"] for g in optim.param_groups)
    before = [p.detach().clone() for p in obj.denoiser.parameters()]
    train_step(obj, torch.device("cuda"), seed=0, optim=optim)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, obj.denoiser.parameters()))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("process", PROCESSES)
def test_compile_gives_the_loss_of_eager_on_cuda(process):
    check_compile_equals_eager(process, torch.device("cuda"), backward=True)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("process", PROCESSES)
def test_sampling_is_byte_identical_for_a_seed_on_cuda(process):
    obj = make_objective(process).cuda().eval()
    batch = {k: v.cuda() for k, v in micro_batch(0).items()}
    ids, nm, att = batch["input_ids"], batch["noise_mask"], batch["attention_mask"]

    def sample(seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        if process == "gaussian":
            return obj.diffusion.sample(obj.denoiser, ids, nm, "uniform_5", generator=gen)
        return obj.diffusion.sample(obj.denoiser, ids, nm, att, 10, topk=5, generator=gen)

    a, b, c = sample(7), sample(7), sample(8)
    assert torch.equal(a.x0, b.x0)
    if process == "gaussian":
        assert torch.equal(a.z0.view(torch.int32), b.z0.view(torch.int32))  # bitwise, not just close
        assert not torch.equal(a.z0, c.z0)
    else:
        assert bool((a.x0 != c.x0).any())


@pytest.mark.cuda
@cuda
@pytest.mark.slow
@pytest.mark.parametrize("first,then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_saved_on_one_device_resumes_on_the_other(tmp_path, tiny_bert, tiny_pairs, first, then):
    """train.py 2 steps on ``first``, then --resume on ``then`` to 4: the weights it starts from are the saved
    ones, and its training state (fused AdamW on CUDA, the foreach loop on the CPU) is rebuilt there."""
    from safetensors.torch import load_file
    out = tmp_path / "run"
    run_cli(*gauss_args(tiny_bert, tiny_pairs, out, max_steps=2, extra=("--device", first)), cwd=str(tmp_path))
    saved = load_file(out / "checkpoints" / "last" / "denoiser.safetensors")
    run_cli(*gauss_args(tiny_bert, tiny_pairs, out, max_steps=4, extra=("--resume", str(out), "--device", then)),
            cwd=str(tmp_path))
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        steps = [r["step"] for r in map(json.loads, f) if r.get("split") == "train"]
        f.seek(0)
        losses = [r["loss"] for r in map(json.loads, f) if r.get("split") == "train"]
    assert steps == [1, 2, 3, 4] and all(map(torch.isfinite, torch.tensor(losses)))
    resumed = load_file(out / "checkpoints" / "last" / "denoiser.safetensors")
    assert saved.keys() == resumed.keys() and any(not torch.equal(saved[k], resumed[k]) for k in saved)


# ------------------------------------------------------------------------------------------ CPU (CI)
def check_bf16_training(obj, device, steps: int = 8):
    """bf16 autocast: the first loss is within bf16 rounding of the fp32 one, and ``steps`` AdamW steps on one
    micro-batch give finite losses that go down."""
    with torch.no_grad(), cpu_draws():
        torch.manual_seed(0)
        fp32 = float(obj({k: v.to(device) for k, v in micro_batch(0).items()}).loss)
        torch.manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = float(obj({k: v.to(device) for k, v in micro_batch(0).items()}).loss)
    assert bf16 == pytest.approx(fp32, rel=0.05)
    optim = adamw(obj.denoiser.parameters(), 3e-3, 0.0, device)
    losses = [train_step(obj, device, seed=0, bf16=True, optim=optim)[0] for _ in range(steps)]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses


def check_compile_equals_eager(process, device, backward: bool):
    """The objective's ``compile_target`` compiled as train.py does (``dynamic=True``): the same loss as eager
    for the same draws (and, with ``backward``, the same gradients)."""
    obj = make_objective(process).to(device)
    if not backward:
        obj.eval()
    batch = {k: v.to(device) for k, v in micro_batch(0).items()}

    def run():
        obj.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with cpu_draws(), torch.set_grad_enabled(backward):
            loss = obj(batch).loss
        if backward:
            loss.backward()
        grads = {n: p.grad.clone() for n, p in obj.denoiser.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads

    with fp32_matmuls() if device.type == "cuda" else contextlib.nullcontext():
        eager, eager_grads = run()
        obj.compile_target.compile(dynamic=True)
        compiled, compiled_grads = run()
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert compiled_grads.keys() == eager_grads.keys()
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("process", PROCESSES)
def test_bf16_autocast_trains_with_a_finite_loss_on_the_cpu(process):
    check_bf16_training(make_objective(process), torch.device("cpu"))


def test_adamw_is_fused_on_cuda_only():
    obj = make_objective("gaussian")
    optim = adamw(obj.denoiser.parameters(), 1e-3, 0.01, torch.device("cpu"))
    assert not any(g["fused"] for g in optim.param_groups)
    # weight decay on the matrices only
    assert {g["weight_decay"] for g in optim.param_groups} == {0.01, 0.0}
    assert all(p.dim() >= 2 for p in optim.param_groups[0]["params"])


@pytest.mark.slow
@pytest.mark.skipif(compile_problem(torch.device("cpu")) is not None, reason="no C++ compiler for inductor")
def test_compile_gives_the_loss_of_eager_on_the_cpu():
    """Inductor on the CPU compiles C++ for every graph: about 25 s of CPU time for this forward on a 2-core
    machine (the backward graph would add minutes), so the CPU check is the forward; CUDA checks both."""
    check_compile_equals_eager("gaussian", torch.device("cpu"), backward=False)


def test_compile_without_a_compiler_is_one_error_line(tmp_path, monkeypatch, tiny_bert, tiny_pairs):
    from torch._inductor import config
    monkeypatch.setattr(config.cpp, "cxx", ("no-such-c++-compiler",))
    assert "C++ compiler" in compile_problem(torch.device("cpu"))
    out = tmp_path / "run"
    p = run_here(*gauss_args(tiny_bert, tiny_pairs, out, max_steps=1, extra=("--compile", "--device", "cpu")),
                 cwd=str(tmp_path))
    one_error_line(p, "--compile", "C++ compiler")
    assert not os.path.isdir(out / "checkpoints")
    p = run_here("bench.py", "--quick", "--compile", "--device", "cpu", cwd=str(tmp_path))
    one_error_line(p, "--compile", "C++ compiler")
