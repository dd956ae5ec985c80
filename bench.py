"""Benchmark: where the time goes in training and sampling, as ratios measured in one run.

    python bench.py --reference                     # MiniLM shape (6 x 384, V 30522), batch 8, length 64, T 2048
    python bench.py --process gaussian              # DiffuSeq transformer: train step, reverse step vs forward
    python bench.py --model bert-base-uncased --batch_size 64 --seq_len 128 --device cuda   # bf16 on CUDA
    python bench.py --quick --model PATH            # a smoke run in seconds (what the tests do)

Absorbing process (DiffusionBERT). Every timing is the median over ``--repeats`` runs, with the
variants interleaved so that drift on a shared machine hits them alike:

* ``floor``: the network alone: forward at the masked positions of an x_t drawn by the process
  (fresh each step), plain cross-entropy against x0, backward, AdamW. What any masked-LM step costs.
* ``ours``: train.py's step (``AbsorbingDiffusion.loss``: the exact per-token bound + hybrid CE).
* ``full_projection``: ours with the 30k-way projection at every position (a fast path turned off).
* ``reference`` (``--reference``): the original code's design: x_t by Gumbel-max over [B, L, V],
  logits at every position, posterior and reverse model as [B, L, V] float64 tensors
  (``diffusion/reference.py``, the tests' oracle), KL over V at every position.

Sampling: one forward (all target positions masked, no grad) is the unit; the sampler's time is
compared with ``network calls x one forward``, with and without the cache, and the dense design's
reverse step (Gumbel-max over [B, L, V] at every position, no cache) is timed per iteration.
Then how time grows with the length and with the number of sampling steps. Peak memory is the
process's peak resident set on the CPU (Linux ``VmHWM``, reset before each phase) and the peak of
``torch.cuda.max_memory_allocated`` on CUDA. ``--json`` writes every number.

Gaussian process (DiffuSeq, ``--process gaussian``): the training step against the network-only
step (forward + MSE + backward + AdamW), and one reverse step (network + clamping against the
V-entry embedding table + posterior) against one forward, plus a full adp_20 decode.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from common.errors import UserError, cli_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--process", default="absorbing", choices=("absorbing", "gaussian"))
    p.add_argument("--model", default="minilm",
                   help="absorbing: a masked LM (hub id, local dir, or minilm); gaussian: the tokenizer's source")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=64, help="tokens per row, [CLS] and [SEP] included")
    p.add_argument("--num_steps", type=int, default=None, help="T (default: 2048 absorbing, 2000 gaussian)")
    p.add_argument("--schedule", default=None, help="absorbing: spindle (default), mutual, cosine; gaussian: sqrt")
    p.add_argument("--sample_steps", type=int, default=128, help="absorbing: sampling iterations")
    p.add_argument("--lengths", default=None, help="lengths for the scaling table (default 32,64,128)")
    p.add_argument("--step_grid", default=None, help="sampling steps for the scaling table (default 16,64,256)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (median reported)")
    p.add_argument("--reference", action="store_true", help="also time the naive [B, L, V] design of the original")
    p.add_argument("--reference_iters", type=int, default=4, help="sampling iterations timed for --reference")
    p.add_argument("--emb_dim", type=int, default=128, help="gaussian: embedding dimension")
    p.add_argument("--hidden_size", type=int, default=384, help="gaussian: encoder width")
    p.add_argument("--num_layers", type=int, default=6, help="gaussian: encoder layers")
    p.add_argument("--num_heads", type=int, default=6, help="gaussian: attention heads")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (as train.py --compile)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="1 repeat, short grids: a smoke run, not a measurement")
    p.add_argument("--json", default=None, help="write every measurement here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.reference_iters = 1, 2
        args.sample_steps = min(args.sample_steps, 8)
    args.lengths = args.lengths or ("16,32" if args.quick else "32,64,128")
    args.step_grid = args.step_grid or ("4,8" if args.quick else "16,64,256")
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
        args.step_grid = [int(x) for x in args.step_grid.split(",")]
    except ValueError:
        raise UserError("--lengths and --step_grid are comma-separated integers") from None
    for name in ("batch_size", "seq_len", "sample_steps", "repeats", "reference_iters"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if min(args.lengths + [args.seq_len]) < 4:
        raise UserError("lengths must be at least 4 ([CLS] two tokens [SEP])")
    return args


# ----------------------------------------------------------------------------------- measuring
class Clock:
    """Wall time of a callable, synchronised on CUDA; peak memory of a phase."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # Linux: "5" resets the peak resident set (VmHWM) to the current one
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


def interleaved(clock: Clock, fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of each ``fns[name]()``, interleaving the variants."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(clock.time(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def optimizer_step(optim, amp, loss_fn):
    """A callable doing one training step: zero grads, ``loss_fn()`` under autocast, backward, step."""
    def run():
        optim.zero_grad(set_to_none=True)
        with amp():
            loss = loss_fn()
        loss.backward()
        optim.step()
    return run


def peak_of(clock: Clock, fn) -> float | None:
    clock.reset_peak()
    fn()
    clock.sync()
    return clock.peak_mb()


# ----------------------------------------------------------------------------------- absorbing
def random_rows(B: int, L: int, V: int, specials: set[int], cls_id: int, sep_id: int, gen) -> tuple:
    """``[CLS] w_1 .. w_{L-2} [SEP]`` rows of random ordinary wordpieces: x0, noise_mask, attention_mask."""
    words = torch.tensor([i for i in range(V) if i not in specials])
    x0 = words[torch.randint(0, len(words), (B, L), generator=gen)]
    x0[:, 0], x0[:, -1] = cls_id, sep_id
    noise_mask = torch.zeros(B, L, dtype=torch.bool)
    noise_mask[:, 1:-1] = True
    return x0, noise_mask, torch.ones_like(x0)


def zipf_counts(V: int, specials: set[int]) -> torch.Tensor:
    """Word-frequency counts for the spindle schedule when no corpus is at hand: Zipf over the ids
    (timing does not depend on the values, only on the schedule being token-dependent)."""
    counts = 1e6 / torch.arange(1, V + 1, dtype=torch.float64)
    counts[list(specials)] = 0
    return counts


def bench_absorbing(args, device: torch.device, clock: Clock, amp) -> dict:
    from diffusion import AbsorbingDiffusion, make_schedule
    from diffusion import reference as ref
    from common.loading import load_masked_lm
    from models import BertDenoiser

    mlm, tok, path = load_masked_lm(args.model, log=lambda *a, **k: None)
    denoiser = BertDenoiser(mlm, "none", args.num_steps).to(device)
    if args.compile:
        denoiser.mlm.base_model.compile(dynamic=True)
    V, mask_id = mlm.config.vocab_size, tok.mask_token_id
    specials = {i for i in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, mask_id, tok.unk_token_id)
                if i is not None}
    schedule_name = args.schedule or "spindle"
    counts = zipf_counts(V, specials) if schedule_name == "spindle" else None
    schedule = make_schedule(schedule_name, counts=counts, lam=0.3, form="released", pad_id=tok.pad_token_id)
    diffusion = AbsorbingDiffusion(schedule, args.num_steps, mask_id, hybrid_lambda=0.01)
    T = args.num_steps
    optim = torch.optim.AdamW(denoiser.parameters(), lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in denoiser.parameters())
    res = {"model": args.model, "model_path": path, "parameters": n_params, "vocab_size": V,
           "layers": mlm.config.num_hidden_layers, "hidden": mlm.config.hidden_size, "schedule": schedule_name, "T": T}

    def batch(L: int, B: int = args.batch_size):
        return tuple(x.to(device) for x in random_rows(B, L, V, specials, tok.cls_token_id, tok.sep_token_id, gen))

    def train_step(loss_fn):
        return optimizer_step(optim, amp, loss_fn)

    def reference_loss(x0, nm, att):
        """The same bound as ``diffusion.loss`` (T x KL + hybrid CE), the dense [B, L, V] way."""
        B = x0.shape[0]
        tr = torch.randint(1, T + 1, (B,), generator=gen).to(device)
        xt = ref.dense_q_sample(x0, tr, nm, schedule, T, mask_id, V)
        logits = denoiser(xt, tr, att, None)
        kl = ref.dense_kl_per_position(logits, x0, xt, tr, tr - 1, nm, schedule, T, mask_id)
        logp = torch.log_softmax(logits.double().masked_fill(
            torch.arange(V, device=device) == mask_id, float("-inf")), -1)
        m = (xt == mask_id) & nm
        ce = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)[m].mean()
        return T * kl.sum() / nm.sum() + diffusion.hybrid_lambda * ce

    def train_variants(L: int, with_reference: bool) -> dict:
        x0, nm, att = batch(L)
        B = x0.shape[0]

        def floor():  # a fresh mask each step, drawn by the same law as the loss's, so as many positions
            t = diffusion.sample_t(B, device)
            x_t = diffusion.q_sample(x0, t, nm)
            masked = (x_t == mask_id) & nm
            logits = denoiser(x_t, t, att, masked)
            return torch.nn.functional.cross_entropy(logits.float(), x0[masked])

        def full_projection_denoiser(x, t_, a, positions):
            return denoiser(x, t_, a, None)[positions]

        fns = {"floor": train_step(floor),
               "ours": train_step(lambda: diffusion.loss(denoiser, x0, nm, att).loss),
               "full_projection": train_step(lambda: diffusion.loss(full_projection_denoiser, x0, nm, att).loss)}
        if with_reference:
            fns["reference"] = train_step(lambda: reference_loss(x0, nm, att))
        out = interleaved(clock, fns, args.repeats)
        out["tokens"] = int(att.sum())
        return out

    # -- training at the main shape, with peak memory per variant (ours first: nothing freed yet)
    x0, nm, att = batch(args.seq_len)
    memory = {"train_ours": peak_of(clock, train_step(lambda: diffusion.loss(denoiser, x0, nm, att).loss))}
    train = train_variants(args.seq_len, args.reference)
    res["train"] = dict(train)
    res["train"]["tokens_per_s"] = train["tokens"] / train["ours"]

    # -- does the reference compute the same bound? (same x_t, t, logits)
    with torch.no_grad():
        t = torch.randint(1, T + 1, (x0.shape[0],), generator=gen).to(device)
        x_t = diffusion.q_sample(x0, t, nm)
        logits = denoiser(x_t, t, att, None).double()
        masked = (x_t == mask_id) & nm
        fast = diffusion.kl(diffusion.log_p_hat(logits[masked]), x0, x_t, t, t - 1, nm).double().sum()
        dense = ref.dense_kl_per_position(logits, x0, x_t, t, t - 1, nm, schedule, T, mask_id).sum()
        res["kl_fast_vs_dense_rel_diff"] = float((fast - dense).abs() / dense.abs().clamp_min(1e-12))

    # -- sampling at the main shape
    def sample(L: int, steps: int, cache: bool, B: int = args.batch_size):
        x0_, nm_, att_ = batch(L, B)

        def timed_denoiser(*a):  # the time spent inside the network, to show the sampler's own share
            start = time.perf_counter()
            out = denoiser(*a)
            clock.sync()
            run.network_s += time.perf_counter() - start
            return out

        def run():
            run.network_s = 0.0
            out = diffusion.sample(timed_denoiser, x0_, nm_, att_, steps, cache=cache,
                                   generator=torch.Generator(device=device).manual_seed(args.seed))
            run.calls, run.rows = out.network_calls, out.row_evaluations
        return run

    def forward_fn(L: int):
        x0_, nm_, att_ = batch(L)
        x_all = x0_.masked_fill(nm_, mask_id)
        t_ = torch.full((x0_.shape[0],), T, device=device)
        def run():
            with torch.no_grad(), amp():
                denoiser(x_all, t_, att_, nm_)
        return run

    denoiser.eval()
    S = args.sample_steps
    cached, uncached = sample(args.seq_len, S, True), sample(args.seq_len, S, False)
    fns = {"forward": forward_fn(args.seq_len), "cache_on": lambda: _amp_call(amp, cached),
           "cache_off": lambda: _amp_call(amp, uncached)}
    samp = interleaved(clock, fns, max(1, args.repeats // 2))
    B = args.batch_size
    res["sample"] = {"steps": S, "forward_s": samp["forward"],
                     "cache_on": {"seconds": samp["cache_on"], "calls": cached.calls, "rows": cached.rows,
                                  "seconds_per_sequence": samp["cache_on"] / B,
                                  "ratio_to_calls_x_forward": samp["cache_on"] / (cached.calls * samp["forward"]),
                                  "rows_per_sequence": cached.rows / B, "positions_per_sequence": args.seq_len - 2,
                                  "network_share": cached.network_s / samp["cache_on"]},
                     "cache_off": {"seconds": samp["cache_off"], "calls": uncached.calls, "rows": uncached.rows,
                                   "seconds_per_sequence": samp["cache_off"] / B,
                                   "ratio_to_calls_x_forward": samp["cache_off"] / (uncached.calls * samp["forward"]),
                                   "network_share": uncached.network_s / samp["cache_off"]}}
    memory["sample_cache_on"] = peak_of(clock, lambda: _amp_call(amp, cached))
    if args.reference:
        x0_, nm_, att_ = batch(args.seq_len)
        grid = diffusion.timesteps(S).to(device)

        def reference_iters():
            g = torch.Generator(device=device).manual_seed(args.seed)
            x = x0_.masked_fill(nm_, mask_id)
            for k in range(args.reference_iters):
                t_, s_ = grid[k].expand(B), grid[k + 1].expand(B)
                with torch.no_grad(), amp():
                    logits = denoiser(x, t_, att_, None)
                x = ref.dense_sample_step(logits.double(), x, t_, s_, nm_, schedule, T, mask_id, g)
        sec = interleaved(clock, {"r": reference_iters}, max(1, args.repeats // 2))["r"] / args.reference_iters
        res["sample"]["reference"] = {"seconds_per_iteration": sec, "ratio_to_forward": sec / samp["forward"],
                                      "projected_seconds": sec * S, "projected_seconds_per_sequence": sec * S / B}
        memory["sample_reference"] = peak_of(clock, reference_iters)
        denoiser.train()
        memory["train_reference"] = peak_of(clock, train_step(lambda: reference_loss(x0, nm, att)))
    denoiser.train()

    # -- scaling with length (training step and cached sampling) and with sampling steps
    res["by_length"] = {}
    for L in args.lengths:
        if L > mlm.config.max_position_embeddings:
            continue
        tv = train_variants(L, False)
        denoiser.eval()
        s_run = sample(L, S, True)
        st = interleaved(clock, {"s": lambda s_run=s_run: _amp_call(amp, s_run), "f": forward_fn(L)},
                         max(1, args.repeats // 2))
        denoiser.train()
        res["by_length"][L] = {"train_s": tv["ours"], "floor_s": tv["floor"], "ratio": tv["ours"] / tv["floor"],
                               "tokens_per_s": tv["tokens"] / tv["ours"], "sample_s_per_sequence": st["s"] / B,
                               "forward_s": st["f"], "sample_calls": s_run.calls}
    denoiser.eval()
    res["by_steps"] = {}
    for n in args.step_grid:
        if n > T:
            continue
        on, off = sample(args.seq_len, n, True), sample(args.seq_len, n, False)
        st = interleaved(clock, {"on": lambda on=on: _amp_call(amp, on), "off": lambda off=off: _amp_call(amp, off)},
                         max(1, args.repeats // 2))
        res["by_steps"][n] = {"cache_on_s_per_sequence": st["on"] / B, "cache_on_calls": on.calls,
                              "cache_off_s_per_sequence": st["off"] / B, "cache_off_calls": off.calls}
    res["memory_mb"] = memory
    return res


def _amp_call(amp, fn):
    with amp():
        fn()


# ----------------------------------------------------------------------------------- gaussian
def bench_gaussian(args, device: torch.device, clock: Clock, amp) -> dict:
    from diffusion import GaussianDiffusion, adaptive_decay_timesteps, gaussian_betas
    from models import DiffuSeqTransformer
    from common.loading import load_tokenizer

    tok, _ = load_tokenizer(args.model)
    V, T, L, B = len(tok), args.num_steps, args.seq_len, args.batch_size
    net = DiffuSeqTransformer(V, args.emb_dim, args.hidden_size, args.num_layers, args.num_heads,
                              max(L, max(args.lengths)), T, dropout=0.1).to(device)
    if args.compile:
        net.encoder.compile(dynamic=True)
    diffusion = GaussianDiffusion(gaussian_betas(args.schedule or "sqrt", T))
    optim = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1000, V, (B, L), generator=gen).to(device)
    noise_mask = (torch.arange(L)[None] >= L // 2).expand(B, L).to(device)  # source | target, half each
    res = {"model": "DiffuSeqTransformer", "parameters": sum(p.numel() for p in net.parameters()), "vocab_size": V,
           "emb_dim": args.emb_dim, "hidden": args.hidden_size, "layers": args.num_layers, "T": T}

    def step(loss_fn):
        return optimizer_step(optim, amp, loss_fn)

    def floor():
        t = torch.randint(0, T, (B,), device=device)
        z0 = net.embed(ids)
        z_t = diffusion.q_sample(z0, t, noise_mask)
        return ((net(z_t, t) - z0.detach()) ** 2)[noise_mask].mean()

    def ours():
        t = torch.randint(0, T, (B,), device=device)
        return diffusion.loss(net, ids, noise_mask, t).loss

    train = interleaved(clock, {"floor": step(floor), "ours": step(ours)}, args.repeats)
    memory = {"train_ours": peak_of(clock, step(ours))}
    net.eval()
    chain = diffusion.respace(range(T))
    z_src = net.embed(ids).detach()
    z = torch.randn(z_src.shape, device=device, generator=torch.Generator(device=device).manual_seed(0))
    t_mid = chain.timesteps[T // 2].to(device).expand(B)

    def forward():
        with torch.no_grad(), amp():
            net(z, t_mid)

    def reverse():
        with torch.no_grad(), amp():
            diffusion.step(net, z, T // 2, chain, noise_mask, z_src)

    steps = interleaved(clock, {"forward": forward, "reverse_step": reverse}, args.repeats)
    adp = adaptive_decay_timesteps(T, 20) if T >= 20 else list(range(T))

    def decode():
        with torch.no_grad(), amp():
            decode.out = diffusion.sample(net, ids, noise_mask, adp,
                                          generator=torch.Generator(device=device).manual_seed(0))
    dec = interleaved(clock, {"d": decode}, max(1, args.repeats // 2), warmup=0)["d"]
    memory["decode_adp_20"] = peak_of(clock, decode)
    res.update({"train": {**train, "tokens_per_s": B * L / train["ours"], "ratio": train["ours"] / train["floor"]},
                "reverse": {**steps, "ratio": steps["reverse_step"] / steps["forward"]},
                "decode_adp_20": {"seconds": dec, "calls": decode.out.network_calls,
                                  "ratio_to_calls_x_forward": dec / (decode.out.network_calls * steps["forward"]),
                                  "seconds_per_sequence": dec / B},
                "memory_mb": memory})
    return res


# ----------------------------------------------------------------------------------- report
def fmt(x, unit: str = "s") -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f} {unit}" if unit == "s" else f"{x:.0f} {unit}"


def report_absorbing(r: dict, args) -> list[str]:
    tr, sm, mem = r["train"], r["sample"], r["memory_mb"]
    lines = [f"## absorbing: {r['model']} ({r['layers']} layers, hidden {r['hidden']}, V {r['vocab_size']}, "
             f"{r['parameters'] / 1e6:.1f}M parameters), batch {args.batch_size}, length {args.seq_len}, "
             f"T {r['T']}, schedule {r['schedule']}", "",
             "| training step | seconds | vs floor |", "|---|---|---|"]
    for k in ("floor", "ours", "full_projection", "reference"):
        if k in tr:
            lines.append(f"| {k} | {tr[k]:.3f} | {tr[k] / tr['floor']:.2f}x |")
    lines += ["", f"- training: {tr['tokens_per_s']:.0f} tokens/s; step / floor = **{tr['ours'] / tr['floor']:.2f}**"
              + (f"; reference / ours = **{tr['reference'] / tr['ours']:.2f}x**" if "reference" in tr else "")
              + f"; full projection / ours = {tr['full_projection'] / tr['ours']:.2f}x",
              f"- the fast bound equals the dense [B, L, V] computation: relative difference "
              f"{r['kl_fast_vs_dense_rel_diff']:.1e}", "",
              f"| sampling, {sm['steps']} steps, {args.batch_size} sequences | seconds | network calls | rows/seq "
              f"| time / (calls x forward) | time in the network |", "|---|---|---|---|---|---|"]
    for k in ("cache_on", "cache_off"):
        s = sm[k]
        lines.append(f"| {k.replace('_', ' ')} | {s['seconds']:.3f} | {s['calls']} | {s['rows'] / args.batch_size:.1f} "
                     f"| **{s['ratio_to_calls_x_forward']:.2f}** | {100 * s['network_share']:.0f}% |")
    lines.append(f"- one forward (all {args.seq_len - 2} target positions masked): {sm['forward_s']:.4f} s; "
                 f"with the cache each sequence is evaluated {sm['cache_on']['rows_per_sequence']:.1f} times for "
                 f"{sm['cache_on']['positions_per_sequence']} positions that change")
    if "reference" in sm:
        rs = sm["reference"]
        lines.append(f"- reference design: {rs['seconds_per_iteration']:.3f} s per iteration = "
                     f"{rs['ratio_to_forward']:.2f}x one forward; {sm['steps']} iterations would take "
                     f"{rs['projected_seconds']:.1f} s vs {sm['cache_on']['seconds']:.1f} s (cache) = "
                     f"**{rs['projected_seconds'] / sm['cache_on']['seconds']:.1f}x**")
    lines += ["", "| length | train step s | vs floor | tokens/s | forward s | sampling s/seq (cache) | calls |",
              "|---|---|---|---|---|---|---|"]
    for L, v in r["by_length"].items():
        lines.append(f"| {L} | {v['train_s']:.3f} | {v['ratio']:.2f}x | {v['tokens_per_s']:.0f} | {v['forward_s']:.4f} "
                     f"| {v['sample_s_per_sequence']:.3f} | {v['sample_calls']} |")
    lines += ["", "| sampling steps | s/seq cache on | calls | s/seq cache off | calls |", "|---|---|---|---|---|"]
    for n, v in r["by_steps"].items():
        lines.append(f"| {n} | {v['cache_on_s_per_sequence']:.3f} | {v['cache_on_calls']} | "
                     f"{v['cache_off_s_per_sequence']:.3f} | {v['cache_off_calls']} |")
    lines += ["", "peak memory: " + ", ".join(f"{k} {fmt(v, 'MB')}" for k, v in mem.items())]
    return lines


def report_gaussian(r: dict, args) -> list[str]:
    tr, rv, dec = r["train"], r["reverse"], r["decode_adp_20"]
    return [f"## gaussian: DiffuSeq transformer (emb {r['emb_dim']}, hidden {r['hidden']}, {r['layers']} layers, "
            f"V {r['vocab_size']}, {r['parameters'] / 1e6:.1f}M parameters), batch {args.batch_size}, length "
            f"{args.seq_len} (half source), T {r['T']}", "",
            "| measurement | seconds | ratio |", "|---|---|---|",
            f"| network-only train step (MSE) | {tr['floor']:.3f} | 1.00x |",
            f"| train step (MSE + rounding + L_T) | {tr['ours']:.3f} | {tr['ratio']:.2f}x |",
            f"| one forward (no grad) | {rv['forward']:.4f} | 1.00x |",
            f"| one reverse step (forward + clamp to {r['vocab_size']} rows + posterior) | {rv['reverse_step']:.4f} "
            f"| **{rv['ratio']:.2f}x** |",
            f"| decode adp_20 ({dec['calls']} calls) | {dec['seconds']:.3f} | {dec['ratio_to_calls_x_forward']:.2f}x "
            f"calls x forward |", "",
            f"training {tr['tokens_per_s']:.0f} tokens/s; peak memory: "
            + ", ".join(f"{k} {fmt(v, 'MB')}" for k, v in r["memory_mb"].items())]


@cli_main
def main(argv=None):
    args = parse_args(argv)
    from runtime.dist import pick_device

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_flush_denormal(True)  # as train.py and the samplers do on the CPU
    use_bf16 = args.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    if args.num_steps is None:
        args.num_steps = 2000 if args.process == "gaussian" else 2048
    torch.manual_seed(args.seed)
    clock = Clock(device)
    start = time.time()
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "bf16": use_bf16, "compile": args.compile}
    if args.process == "absorbing":
        res = bench_absorbing(args, device, clock, amp)
        lines = report_absorbing(res, args)
    else:
        res = bench_gaussian(args, device, clock, amp)
        lines = report_gaussian(res, args)
    res.update(env=env, args={k: v for k, v in vars(args).items()}, wall_seconds=time.time() - start)
    print("\n".join(lines))
    print(f"\n{env['device_type']} ({env['device']}), torch {env['torch']}, {env['threads']} threads, "
          f"bf16 {env['bf16']}; {res['wall_seconds']:.0f} s in all")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        from common.io import write_json_atomic
        write_json_atomic(args.json, res)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
