"""DDP averages gradients like gradient accumulation: two gloo ranks with one micro-batch each give
the gradient that one process gets from the same two micro-batches with ``loss / 2`` each (what
train.py does), for the real training objective (runtime/objective.py) of both processes and of MDLM."""
from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from diffusion import AbsorbingDiffusion, GaussianDiffusion, gaussian_betas, make_schedule
from models import DiffuSeqTransformer
from runtime import dist
from runtime.objective import MDLMObjective, Objective, make_objective as objective_for

B, L, V = 4, 10, 50


def make_objective(process: str) -> Objective:
    """``process``: gaussian, absorbing (the discrete loss) or mdlm (the absorbing process with MDLM's
    continuous-time loss, its log-linear schedule and antithetic t)."""
    mdlm = process == "mdlm"
    cfg = SimpleNamespace(timestep_sampler="uniform", num_steps=20, simi_penalty="none", low_discrepancy=mdlm,
                          simi_lambda=-2.0, simi_noise=0.05, eval_steps=4, loss_average="all", simi_maps="released",
                          loss_weighting="elbo", objective="mdlm" if mdlm else "discrete")
    torch.manual_seed(0)
    if process == "gaussian":
        net = DiffuSeqTransformer(V, emb_dim=8, hidden_size=16, num_layers=1, num_heads=2, max_len=L, num_steps=20,
                                  dropout=0.0)
        return objective_for(net, GaussianDiffusion(gaussian_betas("sqrt", 20)), cfg)
    from transformers import BertConfig, BertForMaskedLM

    from models import BertDenoiser
    mlm = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=L, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0))
    schedule = make_schedule("loglinear" if mdlm else "mutual")
    return objective_for(BertDenoiser(mlm, "none", 20), AbsorbingDiffusion(schedule, 20, mask_id=3), cfg)


def micro_batch(m: int) -> dict:
    g = torch.Generator().manual_seed(100 + m)
    ids = torch.randint(5, V, (B, L), generator=g)
    noise_mask = torch.arange(L)[None].expand(B, L) >= 4
    return {"input_ids": ids, "noise_mask": noise_mask, "attention_mask": torch.ones_like(ids)}


def grads(obj: Objective) -> dict:
    return {n: p.grad.clone() for n, p in obj.denoiser.named_parameters() if p.grad is not None}


def _rank(rank: int, world: int, port: int, process: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    obj = make_objective(process)
    ddp = torch.nn.parallel.DistributedDataParallel(obj)
    torch.manual_seed(1000 + rank)  # the noise of micro-batch `rank`
    ddp(micro_batch(rank)).loss.backward()
    if rank == 0:
        torch.save(grads(obj), out)
    del ddp  # the reducer holds the process group: let cleanup tear it down (runtime.dist.cleanup)
    dist.finish(dist.DistInfo(rank, world))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("process", ["gaussian", "absorbing", "mdlm"])
def test_ddp_gradient_equals_accumulation(tmp_path, process):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_rank, args=(2, free_port(), process, out), nprocs=2, join=True)
    ddp_grads = torch.load(out)

    obj = make_objective(process)
    assert isinstance(obj, MDLMObjective) == (process == "mdlm")
    for m in range(2):
        torch.manual_seed(1000 + m)
        (obj(micro_batch(m)).loss / 2).backward()  # train.py: mean, not sum, over micro-batches
    acc = grads(obj)
    assert acc.keys() == ddp_grads.keys() and len(acc) > 3
    for n in acc:
        assert torch.allclose(ddp_grads[n], acc[n], rtol=1e-4, atol=1e-7), n
    assert any(not torch.allclose(ddp_grads[n], 2 * acc[n], rtol=1e-4, atol=1e-7) for n in acc)  # averaged, not summed
