"""Benchmark: where the time goes in training and sampling, as ratios measured in one run.

    python bench.py --reference                     # MiniLM shape (6 x 384, V 30522), batch 8, length 64, T 2048
    python bench.py --process gaussian              # DiffuSeq transformer: train step, reverse step vs forward
    python bench.py --model bert-base-uncased --batch_size 64 --seq_len 128 --device cuda   # bf16 on CUDA
    python bench.py --quick --model PATH            # a smoke run in seconds (what the tests do)
    python bench.py --seq2seq_padding --batch_size 32 --seq_len 128   # the qqp preset's step: padding to max_len vs longest

Absorbing process (DiffusionBERT), in three measurements: training (``absorbing_training``),
sampling (``absorbing_sampling``) and scaling with length and steps (``absorbing_scaling``). Every
timing is the median over ``--repeats`` runs, with the variants interleaved so that drift on a shared
machine hits them alike. Training steps run in train mode (dropout on, as in train.py's loop),
forwards and sampling in eval mode.

Training, the step of:

* ``floor``: the network alone: forward at the masked positions of an x_t drawn by the process
  (fresh each step), plain cross-entropy against x0, backward, AdamW. What any masked-LM step costs.
* ``ours``: train.py's step (``AbsorbingDiffusion.loss``: the exact per-token bound + hybrid CE).
* ``full_projection``: ours with the 30k-way projection at every position (a fast path turned off).
* ``mdlm``: ``--objective mdlm``'s step (``diffusion.mdlm.loss``: the log-linear schedule, antithetic t), so
  that equal steps can be turned into equal wall time against ``ours``.
* ``reference`` (``--reference``): the original code's design: x_t by Gumbel-max over [B, L, V],
  logits at every position, posterior and reverse model as [B, L, V] float64 tensors
  (``diffusion.reference.dense_loss``, the tests' oracle), KL over V at every position. The run
  also reports how far the fast bound is from the dense one at this shape (float32 rounding); the
  tests assert that the two are equal.

Sampling: one forward (all target positions masked, no grad) is the unit; the sampler's time is
compared with ``network calls x one forward``, with and without the cache, and the dense design's
reverse step (Gumbel-max over [B, L, V] at every position, no cache) is timed per iteration.
Then how time grows with the length and with the number of sampling steps. Peak memory is the
process's peak resident set on the CPU (Linux ``VmHWM``, reset before each phase) and the peak of
``torch.cuda.max_memory_allocated`` on CUDA. ``--json`` writes every number.

Seq2seq padding (``--seq2seq_padding``): the training step of the qqp preset's shape (``--seq_len`` is its
``--max_len``, mutual schedule, T 2000, DiffusionBERT's loss weighting with hybrid lambda 3e-4, AdamW) on
QQP-like pairs that the bench writes as a DiffuSeq jsonl folder (KJV -> WEB verse pairs cut to question-like
word counts: about 10 words a side) and reads through the real data path (``load_pair_splits``,
``tokenize_pairs``, ``PairCollator``). The same batches are laid out on the ``--seq_len`` canvas
(``--pad_to max_len``, before) and to their longest row (``--pad_to longest``, after), interleaved.

Gaussian process (DiffuSeq, ``--process gaussian``): training (``gaussian_training``, train mode),
the step against the network-only step (forward + MSE + backward + AdamW); sampling
(``gaussian_sampling``, eval mode), one reverse step (network + clamping against the V-entry
embedding table + posterior) against one forward, plus a full adp_20 decode. The step is timed as
``sample`` runs it: the table and its ``|e|^2`` prepared once per decode (``EmbeddingIndex``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

if __name__ == "__main__":  # as every script: on jemalloc where it is installed (common/heap.py)
    from common.heap import prefer_jemalloc
    prefer_jemalloc()

import torch

from common.cli import make_parser
from common.errors import UserError, cli_main
from diffusion import PROCESSES


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--process", default="absorbing", choices=PROCESSES)
    p.add_argument("--model", default="minilm",
                   help="absorbing: a masked LM (hub id, local dir, or minilm); gaussian: the tokenizer's source")
    p.add_argument("--batch_size", type=int, default=None,
                   help="rows per batch (default: 8; with --memory, the demo's 16 for training and 32 for sampling)")
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
    p.add_argument("--seq2seq_padding", action="store_true",
                   help="only the seq2seq training step padded to --seq_len against padded to the batch's longest row")
    p.add_argument("--pairs", type=int, default=512, help="--seq2seq_padding: QQP-like pairs written and read")
    p.add_argument("--batches", type=int, default=4, help="--seq2seq_padding: batches timed per repeat")
    m = p.add_argument_group("memory (--memory): does the resident set stay flat over a long run?")
    m.add_argument("--memory", choices=("train", "sample", "both"), default=None,
                   help="instead of the timings: train.py in a child process at the demo's shape (run.sh's flags) "
                        "and/or a long sampling run through runtime.api, recording the RSS every --memory_every steps")
    m.add_argument("--memory_steps", type=int, default=2000, help="training steps (train.py --max_steps)")
    m.add_argument("--memory_heap", default="default",
                   help="the heap settings, a comma-separated list of " + ", ".join(HEAP_ARMS) + " (common/heap.py; "
                        "'default' is what the scripts do in this environment). Training runs one child per setting, "
                        "all at once on the same batches, and gives each one's step time over the first's; "
                        "sampling takes one setting")
    m.add_argument("--sample_calls", type=int, default=2000,
                   help="sampling: network calls in all (batches of --sample_steps iterations, repeated)")
    m.add_argument("--sample_length", type=int, default=None,
                   help="sampling: every sample this many wordpieces (default: drawn from the training lengths, as "
                        "predict.py; a fixed length gives every batch the same shape)")
    m.add_argument("--memory_every", type=int, default=100, help="record the RSS every this many steps or calls")
    m.add_argument("--memory_from", type=int, default=200,
                   help="growth is measured from the record at this step (or call) to the last one")
    m.add_argument("--checkpoint", default=None,
                   help="--memory sample: sample from this checkpoint (default: the one the training phase wrote)")
    m.add_argument("--memory_hidden", type=int, default=None,
                   help="train a from-scratch BERT of this width (with --memory_layers) and --model's tokenizer "
                        "instead of --model itself: a smaller network than the demo's MiniLM (384 x 6), for a "
                        "machine too busy for it")
    m.add_argument("--memory_layers", type=int, default=2, help="layers of the --memory_hidden network")
    m.add_argument("--train_args", default="",
                   help="extra train.py flags, appended after the demo's (they win), e.g. '--eval_every 500'")
    args = p.parse_args(argv)
    if args.batch_size is None and not args.memory:
        args.batch_size = 8
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
    for name in ("batch_size", "seq_len", "sample_steps", "repeats", "reference_iters", "memory_steps",
                 "sample_calls", "memory_every", "memory_hidden", "memory_layers", "sample_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if min(args.lengths + [args.seq_len]) < 4:
        raise UserError("lengths must be at least 4 ([CLS] two tokens [SEP])")
    args.memory_heap = [a.strip() for a in args.memory_heap.split(",") if a.strip()]
    if not args.memory_heap or len(set(args.memory_heap)) < len(args.memory_heap) or \
            any(a not in HEAP_ARMS for a in args.memory_heap):
        raise UserError(f"--memory_heap takes distinct settings among {', '.join(HEAP_ARMS)}, comma-separated")
    if len(args.memory_heap) > 1 and args.memory != "train":
        raise UserError("several --memory_heap settings run trainings side by side; sampling runs in this process: "
                        "give --memory train, or one setting")
    if args.memory in ("sample", "both"):  # sampling runs in this process, on the malloc it started with
        from common import heap
        arm = args.memory_heap[0]
        if arm == "notrim":
            raise UserError("--memory_heap notrim turns off the training loop's trims; sampling has none to turn off")
        if arm != "default" and (arm == "jemalloc") != heap.jemalloc_in_use():
            raise UserError(f"--memory {args.memory} samples in this process, which has {heap.malloc_name()}'s "
                            f"malloc: for --memory_heap {arm} run bench.py with {heap.JEMALLOC_ENV}="
                            + ("off" if arm != "jemalloc" else "<path of libjemalloc.so.2>"))
    if args.memory == "sample" and not args.checkpoint:
        raise UserError("--memory sample needs --checkpoint (or use --memory both, which samples from what it trained)")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint}: no such directory")
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


class Absorbing:
    """What the absorbing measurements share: the masked LM as a time-agnostic ``BertDenoiser``, the
    process (spindle on Zipf counts unless ``--schedule``; hybrid lambda 0.01 as train.py), AdamW, and
    random rows. The network's mode is set by each measurement: train mode (dropout on, as in
    train.py's loop) for training steps, eval mode for forwards and sampling."""

    def __init__(self, args, device: torch.device, clock: Clock, amp):
        from diffusion import AbsorbingDiffusion, make_schedule
        from common.loading import load_masked_lm
        from models import BertDenoiser

        self.args, self.device, self.clock, self.amp = args, device, clock, amp
        mlm, tok, path = load_masked_lm(args.model, log=lambda *a, **k: None)
        self.denoiser = BertDenoiser(mlm, "none", args.num_steps).to(device)
        if args.compile:
            self.denoiser.mlm.base_model.compile(dynamic=True)
        self.V, self.mask_id, self.T = mlm.config.vocab_size, tok.mask_token_id, args.num_steps
        self.max_len, self.cls_id, self.sep_id = mlm.config.max_position_embeddings, tok.cls_token_id, tok.sep_token_id
        self.specials = {i for i in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, self.mask_id,
                                     tok.unk_token_id) if i is not None}
        name = args.schedule or "spindle"
        counts = zipf_counts(self.V, self.specials) if name == "spindle" else None
        self.schedule = make_schedule(name, counts=counts, lam=0.3, form="released", pad_id=tok.pad_token_id)
        self.diffusion = AbsorbingDiffusion(self.schedule, self.T, self.mask_id, hybrid_lambda=0.01)
        self.optim = torch.optim.AdamW(self.denoiser.parameters(), lr=1e-5, fused=device.type == "cuda")
        self.gen = torch.Generator().manual_seed(args.seed)
        self.header = {"model": args.model, "model_path": path,
                       "parameters": sum(p.numel() for p in self.denoiser.parameters()), "vocab_size": self.V,
                       "layers": mlm.config.num_hidden_layers, "hidden": mlm.config.hidden_size, "schedule": name,
                       "T": self.T}

    def batch(self, L: int, B: int | None = None) -> tuple:
        rows = random_rows(B or self.args.batch_size, L, self.V, self.specials, self.cls_id, self.sep_id, self.gen)
        return tuple(x.to(self.device) for x in rows)

    def train_step(self, loss_fn):
        return optimizer_step(self.optim, self.amp, loss_fn)

    def ours(self, x0, nm, att):
        """train.py's loss: the exact per-token bound + hybrid CE, the projection at masked positions."""
        return lambda: self.diffusion.loss(self.denoiser, x0, nm, att).loss

    def reference(self, x0, nm, att):
        """The same loss the original code's way: [B, L, V] float64 tensors at every position."""
        from diffusion import reference as ref
        return lambda: ref.dense_loss(self.denoiser, x0, nm, att, self.schedule, self.T, self.mask_id, self.V,
                                      self.diffusion.hybrid_lambda)

    def sampler(self, L: int, steps: int, cache: bool):
        """A callable running ``diffusion.sample`` on a batch; it records calls, rows and the network's time."""
        x0, nm, att = self.batch(L)
        denoiser, clock, amp, device, seed = self.denoiser, self.clock, self.amp, self.device, self.args.seed

        def timed_denoiser(*a):  # the time spent inside the network, to show the sampler's own share
            start = time.perf_counter()
            out = denoiser(*a)
            clock.sync()
            run.network_s += time.perf_counter() - start
            return out

        def run():
            run.network_s = 0.0
            with amp():
                out = self.diffusion.sample(timed_denoiser, x0, nm, att, steps, cache=cache,
                                            generator=torch.Generator(device=device).manual_seed(seed))
            run.calls, run.rows = out.network_calls, out.row_evaluations
        return run

    def forward(self, L: int):
        """A callable doing one no-grad forward with all target positions masked (the sampler's first call)."""
        x0, nm, att = self.batch(L)
        x_all = x0.masked_fill(nm, self.mask_id)
        t = torch.full((x0.shape[0],), self.T, device=self.device)

        def run():
            with torch.no_grad(), self.amp():
                self.denoiser(x_all, t, att, nm)
        return run


def absorbing_train_variants(ab: Absorbing, L: int, with_reference: bool) -> dict:
    """Median seconds of one training step per variant at length L, interleaved, in train mode."""
    ab.denoiser.train()  # dropout on, as train.py trains (from_pretrained returns the model in eval mode)
    x0, nm, att = ab.batch(L)
    B, diffusion, denoiser, mask_id = x0.shape[0], ab.diffusion, ab.denoiser, ab.mask_id

    def floor():  # a fresh mask each step, drawn by the same law as the loss's, so as many positions
        t = diffusion.sample_t(B, ab.device)
        x_t = diffusion.q_sample(x0, t, nm)
        masked = (x_t == mask_id) & nm
        logits = denoiser(x_t, t, att, masked)
        return torch.nn.functional.cross_entropy(logits.float(), x0[masked])

    def full_projection_denoiser(x, t_, a, positions):
        return denoiser(x, t_, a, None)[positions]

    from diffusion import AbsorbingDiffusion, make_schedule, mdlm
    loglinear = AbsorbingDiffusion(make_schedule("loglinear"), ab.T, mask_id)
    fns = {"floor": ab.train_step(floor), "ours": ab.train_step(ab.ours(x0, nm, att)),
           "full_projection": ab.train_step(lambda: diffusion.loss(full_projection_denoiser, x0, nm, att).loss),
           "mdlm": ab.train_step(lambda: mdlm.loss(loglinear, denoiser, x0, nm, att, low_discrepancy=True).loss)}
    if with_reference:
        fns["reference"] = ab.train_step(ab.reference(x0, nm, att))
    out = interleaved(ab.clock, fns, ab.args.repeats)
    out["tokens"] = int(att.sum())
    return out


def absorbing_training(ab: Absorbing) -> tuple[dict, dict]:
    """The training table at the main shape, and its peak memory (``ours`` first: nothing freed yet)."""
    args = ab.args
    ab.denoiser.train()
    x0, nm, att = ab.batch(args.seq_len)
    memory = {"train_ours": peak_of(ab.clock, ab.train_step(ab.ours(x0, nm, att)))}
    train = absorbing_train_variants(ab, args.seq_len, args.reference)
    train["tokens_per_s"] = train["tokens"] / train["ours"]
    if args.reference:
        memory["train_reference"] = peak_of(ab.clock, ab.train_step(ab.reference(x0, nm, att)))
    return train, memory


@torch.no_grad()
def absorbing_fast_vs_dense(ab: Absorbing) -> float:
    """Relative difference of the fast bound and the dense [B, L, V] one at this shape (same x_t, t,
    logits). A measurement of float32 rounding at full size; the equality is asserted by the tests."""
    from diffusion import reference as ref

    ab.denoiser.eval()
    x0, nm, att = ab.batch(ab.args.seq_len)
    t = torch.randint(1, ab.T + 1, (x0.shape[0],), generator=ab.gen).to(ab.device)
    x_t = ab.diffusion.q_sample(x0, t, nm)
    logits = ab.denoiser(x_t, t, att, None).double()
    masked = (x_t == ab.mask_id) & nm
    fast = ab.diffusion.kl(ab.diffusion.log_p_hat(logits[masked]), x0, x_t, t, t - 1, nm).double().sum()
    dense = ref.dense_kl_per_position(logits, x0, x_t, t, t - 1, nm, ab.schedule, ab.T, ab.mask_id).sum()
    return float((fast - dense).abs() / dense.abs().clamp_min(1e-12))


def absorbing_sampling(ab: Absorbing) -> tuple[dict, dict]:
    """The sampling table at the main shape (eval mode): cache on and off against network calls x one
    forward; with ``--reference`` the dense design's reverse step per iteration. Also peak memory."""
    from diffusion import reference as ref

    args, clock, B, S = ab.args, ab.clock, ab.args.batch_size, ab.args.sample_steps
    ab.denoiser.eval()
    cached, uncached = ab.sampler(args.seq_len, S, True), ab.sampler(args.seq_len, S, False)
    samp = interleaved(clock, {"forward": ab.forward(args.seq_len), "cache_on": cached, "cache_off": uncached},
                       max(1, args.repeats // 2))
    out = {"steps": S, "forward_s": samp["forward"]}
    for key, run in (("cache_on", cached), ("cache_off", uncached)):
        out[key] = {"seconds": samp[key], "calls": run.calls, "rows": run.rows, "seconds_per_sequence": samp[key] / B,
                    "ratio_to_calls_x_forward": samp[key] / (run.calls * samp["forward"]),
                    "rows_per_sequence": run.rows / B, "positions_per_sequence": args.seq_len - 2,
                    "network_share": run.network_s / samp[key]}
    memory = {"sample_cache_on": peak_of(clock, cached)}
    if args.reference:
        x0, nm, att = ab.batch(args.seq_len)
        grid = ab.diffusion.timesteps(S).to(ab.device)

        def reference_iters():
            g = torch.Generator(device=ab.device).manual_seed(args.seed)
            x = x0.masked_fill(nm, ab.mask_id)
            for k in range(args.reference_iters):
                t, s = grid[k].expand(B), grid[k + 1].expand(B)
                with torch.no_grad(), ab.amp():
                    logits = ab.denoiser(x, t, att, None)
                x = ref.dense_sample_step(logits.double(), x, t, s, nm, ab.schedule, ab.T, ab.mask_id, g)
        sec = interleaved(clock, {"r": reference_iters}, max(1, args.repeats // 2))["r"] / args.reference_iters
        out["reference"] = {"seconds_per_iteration": sec, "ratio_to_forward": sec / samp["forward"],
                            "projected_seconds": sec * S, "projected_seconds_per_sequence": sec * S / B}
        memory["sample_reference"] = peak_of(clock, reference_iters)
    return out, memory


def absorbing_scaling(ab: Absorbing) -> tuple[dict, dict]:
    """How the training step (train mode) and cached sampling (eval mode) grow with the length, and
    sampling with the number of steps."""
    args, clock, B = ab.args, ab.clock, ab.args.batch_size
    half = max(1, args.repeats // 2)
    by_length = {}
    for L in args.lengths:
        if L > ab.max_len:
            continue
        tv = absorbing_train_variants(ab, L, False)
        ab.denoiser.eval()
        run = ab.sampler(L, args.sample_steps, True)
        st = interleaved(clock, {"s": run, "f": ab.forward(L)}, half)
        by_length[L] = {"train_s": tv["ours"], "floor_s": tv["floor"], "ratio": tv["ours"] / tv["floor"],
                        "tokens_per_s": tv["tokens"] / tv["ours"], "sample_s_per_sequence": st["s"] / B,
                        "forward_s": st["f"], "sample_calls": run.calls}
    ab.denoiser.eval()
    by_steps = {}
    for n in args.step_grid:
        if n > ab.T:
            continue
        on, off = ab.sampler(args.seq_len, n, True), ab.sampler(args.seq_len, n, False)
        st = interleaved(clock, {"on": on, "off": off}, half)
        by_steps[n] = {"cache_on_s_per_sequence": st["on"] / B, "cache_on_calls": on.calls,
                       "cache_off_s_per_sequence": st["off"] / B, "cache_off_calls": off.calls}
    return by_length, by_steps


def bench_absorbing(args, device: torch.device, clock: Clock, amp) -> dict:
    ab = Absorbing(args, device, clock, amp)
    res = dict(ab.header)
    res["train"], train_memory = absorbing_training(ab)
    if args.reference:
        res["kl_fast_vs_dense_rel_diff"] = absorbing_fast_vs_dense(ab)
    res["sample"], sample_memory = absorbing_sampling(ab)
    res["by_length"], res["by_steps"] = absorbing_scaling(ab)
    res["memory_mb"] = {**train_memory, **sample_memory}
    return res


# ----------------------------------------------------------------------------------- seq2seq padding
def qqp_like_folder(folder: str, n: int, seed: int) -> None:
    """A DiffuSeq folder (train.jsonl) of ``n`` QQP-like pairs: KJV -> WEB verse pairs, each side cut to a word
    count drawn like a question's (normal, mean 10, sd 4, clipped to 3..30: an assumption, not QQP's own
    statistics), the target to its own draw."""
    import json
    import random

    from textdata.bible import load_verse_pairs
    rng = random.Random(seed)
    pairs, _ = load_verse_pairs()
    rows = []
    for p in rng.sample(pairs, n):
        cut = [min(30, max(3, round(rng.gauss(10, 4)))) for _ in range(2)]
        rows.append({"src": " ".join(p.kjv.split()[:cut[0]]), "trg": " ".join(p.web.split()[:cut[1]])})
    with open(os.path.join(folder, "train.jsonl"), "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def bench_seq2seq_padding(args, device: torch.device, clock: Clock, amp) -> dict:
    """The qqp-shape training step on the same batches laid out to --seq_len (before) and to the longest row."""
    import tempfile

    from common.loading import load_tokenizer
    from conditional_data import PairCollator, load_pair_splits, tokenize_pairs
    args.schedule = args.schedule or "mutual"
    ab = Absorbing(args, device, clock, amp)
    ab.diffusion.hybrid_lambda = 3e-4  # DDP_main_conditional.py's, the qqp preset's
    tok, _ = load_tokenizer(args.model)
    quiet = lambda *a, **k: None  # noqa: E731
    with tempfile.TemporaryDirectory() as folder:
        qqp_like_folder(folder, args.pairs, args.seed)
        data = tokenize_pairs(load_pair_splits("qqp", folder, splits=("train",), log=quiet), tok, args.seq_len,
                              log=quiet)["train"]
    lens = [len(a) + len(b) for a, b in zip(data["src_ids"], data["trg_ids"])]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
    rows = [[data[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]] for k in range(args.batches)]
    layouts = {"before": PairCollator(tok.pad_token_id, canvas_len=args.seq_len), "after": PairCollator(tok.pad_token_id)}
    batches = {k: [{n: v.to(device) for n, v in c(r).items()} for r in rows] for k, c in layouts.items()}

    def steps(name):
        fns = [ab.train_step(lambda b=b: ab.diffusion.loss(ab.denoiser, b["input_ids"], b["noise_mask"],
                                                           b["attention_mask"], weighting="released").loss)
               for b in batches[name]]
        return lambda: [f() for f in fns]

    ab.denoiser.train()
    t = interleaved(clock, {k: steps(k) for k in batches}, args.repeats)
    res = dict(ab.header, pairs=len(lens), mean_pair_tokens=sum(lens) / len(lens), max_pair_tokens=max(lens),
               batch_size=args.batch_size, canvas=args.seq_len, batches=args.batches)
    for k, b in batches.items():
        res[k] = {"step_s": t[k] / args.batches, "mean_width": sum(x["input_ids"].shape[1] for x in b) / len(b)}
    res["speedup"] = res["before"]["step_s"] / res["after"]["step_s"]
    return res


def report_seq2seq_padding(r: dict, args) -> list[str]:
    b, a = r["before"], r["after"]
    return [f"## seq2seq padding: {r['model']} ({r['layers']} layers, hidden {r['hidden']}), batch {r['batch_size']}, "
            f"--max_len {r['canvas']}, T {r['T']}, schedule {r['schedule']}, loss weighting released", "",
            f"{r['pairs']} QQP-like pairs: {r['mean_pair_tokens']:.1f} tokens on average with the special tokens, "
            f"at most {r['max_pair_tokens']}; {r['batches']} batches, the median of {args.repeats} repeats", "",
            "| layout | canvas width (mean) | training step s |", "|---|---|---|",
            f"| before: every row --max_len (--pad_to max_len) | {b['mean_width']:.1f} | {b['step_s']:.3f} |",
            f"| after: the batch's longest row (--pad_to longest) | {a['mean_width']:.1f} | {a['step_s']:.3f} |", "",
            f"- step before / after = **{r['speedup']:.2f}x**"]


# ----------------------------------------------------------------------------------- gaussian
class Gaussian:
    """What the Gaussian measurements share: a DiffuSeq transformer (dropout 0.1, train.py's default),
    the process, AdamW, and a batch whose second half is the target."""

    def __init__(self, args, device: torch.device, clock: Clock, amp):
        from diffusion import GaussianDiffusion, gaussian_betas
        from models import DiffuSeqTransformer
        from common.loading import load_tokenizer

        self.args, self.device, self.clock, self.amp = args, device, clock, amp
        tok, _ = load_tokenizer(args.model)
        V, T, L, B = len(tok), args.num_steps, args.seq_len, args.batch_size
        self.T, self.B, self.L = T, B, L
        self.net = DiffuSeqTransformer(V, args.emb_dim, args.hidden_size, args.num_layers, args.num_heads,
                                       max(L, max(args.lengths)), T, dropout=0.1).to(device)
        if args.compile:
            self.net.encoder.compile(dynamic=True)
        self.diffusion = GaussianDiffusion(gaussian_betas(args.schedule or "sqrt", T))
        self.optim = torch.optim.AdamW(self.net.parameters(), lr=1e-4, fused=device.type == "cuda")
        gen = torch.Generator().manual_seed(args.seed)
        self.ids = torch.randint(1000, V, (B, L), generator=gen).to(device)
        self.noise_mask = (torch.arange(L)[None] >= L // 2).expand(B, L).to(device)  # source | target, half each
        self.header = {"model": "DiffuSeqTransformer", "parameters": sum(p.numel() for p in self.net.parameters()),
                       "vocab_size": V, "emb_dim": args.emb_dim, "hidden": args.hidden_size,
                       "layers": args.num_layers, "T": T}


def gaussian_training(g: Gaussian) -> tuple[dict, dict]:
    """The training step against the network-only step (forward + MSE + backward + AdamW), in train mode."""
    net, diffusion, ids, noise_mask, T, B = g.net, g.diffusion, g.ids, g.noise_mask, g.T, g.B
    net.train()  # dropout on, as train.py trains

    def floor():
        t = torch.randint(0, T, (B,), device=g.device)
        z0 = net.embed(ids)
        z_t = diffusion.q_sample(z0, t, noise_mask)
        return ((net(z_t, t) - z0.detach()) ** 2)[noise_mask].mean()

    def ours():
        t = torch.randint(0, T, (B,), device=g.device)
        return diffusion.loss(net, ids, noise_mask, t).loss

    def step(loss_fn):
        return optimizer_step(g.optim, g.amp, loss_fn)

    train = interleaved(g.clock, {"floor": step(floor), "ours": step(ours)}, g.args.repeats)
    memory = {"train_ours": peak_of(g.clock, step(ours))}
    return {**train, "tokens_per_s": B * g.L / train["ours"], "ratio": train["ours"] / train["floor"]}, memory


def gaussian_sampling(g: Gaussian) -> tuple[dict, dict, dict]:
    """One reverse step (network + clamping against the V-row table + posterior) against one forward,
    and a full adp_20 decode against calls x one forward, in eval mode."""
    from diffusion import adaptive_decay_timesteps
    from diffusion.gaussian import EmbeddingIndex

    net, diffusion, ids, noise_mask, T, B, amp = g.net, g.diffusion, g.ids, g.noise_mask, g.T, g.B, g.amp
    net.eval()
    z_src = net.embed(ids).detach()
    z = torch.randn(z_src.shape, device=g.device, generator=torch.Generator(device=g.device).manual_seed(0))
    t_mid = torch.full((B,), T // 2, device=g.device)

    def forward():
        with torch.no_grad(), amp():
            net(z, t_mid)

    index = EmbeddingIndex.build(net.embedding_weight.detach(), z.dtype)  # once per decode, as sample does

    def reverse():
        with torch.no_grad(), amp():
            diffusion.step(net(z, t_mid), T // 2, T // 2 - 1, z, noise_mask, z_src, index)

    steps = interleaved(g.clock, {"forward": forward, "reverse_step": reverse}, g.args.repeats)
    adp = adaptive_decay_timesteps(T, 20) if T >= 20 else list(range(T))

    def decode():
        with torch.no_grad(), amp():
            decode.out = diffusion.sample(net, ids, noise_mask, adp,
                                          generator=torch.Generator(device=g.device).manual_seed(0))
    dec = interleaved(g.clock, {"d": decode}, max(1, g.args.repeats // 2), warmup=0)["d"]
    memory = {"decode_adp_20": peak_of(g.clock, decode)}
    return ({**steps, "ratio": steps["reverse_step"] / steps["forward"]},
            {"seconds": dec, "calls": decode.out.network_calls,
             "ratio_to_calls_x_forward": dec / (decode.out.network_calls * steps["forward"]),
             "seconds_per_sequence": dec / B}, memory)


def bench_gaussian(args, device: torch.device, clock: Clock, amp) -> dict:
    g = Gaussian(args, device, clock, amp)
    res = dict(g.header)
    res["train"], train_memory = gaussian_training(g)
    res["reverse"], res["decode_adp_20"], sample_memory = gaussian_sampling(g)
    res["memory_mb"] = {**train_memory, **sample_memory}
    return res


# ----------------------------------------------------------------------------------- memory
# the heap settings --memory compares (common/heap.py): what the scripts do here (jemalloc where one is installed,
# else glibc's malloc with trims), jemalloc ($DLM_JEMALLOC or the system's), and glibc's malloc with its dynamic
# mmap threshold, with a fixed 8 MB one, and without the training loop's trims
HEAP_ARMS = {"default": {}, "jemalloc": {}, "glibc": {"DLM_MMAP_THRESHOLD": "0"},
             "fixed": {"DLM_MMAP_THRESHOLD": str(8 << 20)}, "notrim": {"DLM_TRIM_BUDGET": "0"}}


def arm_env(arm: str, env: dict) -> dict:
    """The environment of a run under heap setting ``arm``, from ``env`` (this process's): the glibc settings
    turn jemalloc off (``$DLM_JEMALLOC``, and a jemalloc in ``LD_PRELOAD`` that this process started on);
    ``jemalloc`` keeps a ``$DLM_JEMALLOC`` path and otherwise lets the script find the system's."""
    from common import heap
    env = {**env, **HEAP_ARMS[arm]}
    if arm == "jemalloc" and heap.jemalloc_off(env):
        env.pop(heap.JEMALLOC_ENV, None)
    if arm not in ("default", "jemalloc"):
        env[heap.JEMALLOC_ENV] = "off"
        env.pop(heap.REEXEC_ENV, None)
        kept = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if "jemalloc" not in p]
        env.pop("LD_PRELOAD", None)
        if kept:
            env["LD_PRELOAD"] = " ".join(kept)
    return env


# run.sh's demo training flags (TRAIN_ARGS), less the model, length and step count that bench.py sets
DEMO_TRAIN_ARGS = ["--dataset", "bible", "--num_steps", "2048", "--schedule", "spindle", "--word_freq_lambda", "0.3",
                   "--time_conditioning", "none", "--loss_weighting", "released", "--batch_size", "16",
                   "--accumulation_steps", "1", "--lr", "1.5e-4", "--warmup_steps", "30", "--eval_every", "100",
                   "--eval_examples", "128", "--eval_steps", "16", "--save_every", "100", "--log_every", "10"]


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float | None:
    """A process's resident set in MB from /proc (Linux): ``VmRSS`` now, or ``VmHWM``, its peak since the last
    :func:`reset_peak_rss`, or one part of it: ``RssAnon`` (the heap and other private memory, where a leak
    grows) or ``RssFile`` (pages of mapped files, such as a memory-mapped dataset: they grow as more of the file
    is read, and the kernel can drop them); None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss(pid: int | str = "self") -> None:
    """Start a new peak window: Linux sets VmHWM back to the current RSS when "5" is written to clear_refs."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


MEASURES = {"rss_mb": "RSS", "anon_mb": "anonymous (heap)", "file_mb": "file-backed", "peak_mb": "peak per window"}


def cpu_counts(pid: int | str = "self") -> dict:
    """A process's minor page faults so far and its CPU seconds in user and in kernel mode, from
    /proc/PID/stat (fields 10, 14 and 15; Linux); empty where /proc cannot tell. A page that a trim gave back
    and a step uses again costs a minor fault, paid in kernel time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    return {"minor_faults": int(fields[7]), "user_s": int(fields[11]) / tick, "system_s": int(fields[12]) / tick}


def rss_record(step: int, pid: int | str, start: float) -> dict:
    """The RSS now and the peak since the previous record (whose window this record closes), then a new window;
    with the process's fault and CPU-time counts so far."""
    rec = {"step": step, "rss_mb": rss_mb(pid), "peak_mb": rss_mb(pid, "VmHWM"), "anon_mb": rss_mb(pid, "RssAnon"),
           "file_mb": rss_mb(pid, "RssFile"), "seconds": round(time.time() - start, 1), **cpu_counts(pid)}
    reset_peak_rss(pid)
    return rec


def growth(records: list[dict], start: int, key: str = "rss_mb") -> dict:
    """How ``key`` (``rss_mb`` or ``peak_mb``) moved after the warm-up: ``records`` are ``{"step", key}`` in step
    order; the base is the first record at or after ``start``. Returns the base, the last and the highest later
    value, and the growth to the last and to the highest as fractions of the base (None without a record at or
    after ``start``)."""
    later = [r for r in records if r["step"] >= start and r.get(key) is not None]
    if not later:
        return {"from_step": start, "base_mb": None, "end_mb": None, "max_mb": None, "growth": None, "max_growth": None}
    base, end, top = later[0][key], later[-1][key], max(r[key] for r in later)
    return {"from_step": later[0]["step"], "to_step": later[-1]["step"], "base_mb": base, "end_mb": end,
            "max_mb": top, "growth": (end - base) / base, "max_growth": (top - base) / base}


def new_records(path: str, offset: int) -> tuple[list[dict], int]:
    """The complete lines of a growing ``metrics.jsonl`` after byte ``offset``, and the offset after them."""
    import json
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    done = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
    return [json.loads(line) for line in done.splitlines() if line.strip()], offset + len(done)


def small_network(model: str, hidden: int, layers: int, out_dir: str) -> str:
    """A from-scratch BertForMaskedLM (``hidden`` wide, ``layers`` deep, heads of 64) with ``model``'s tokenizer,
    saved in ``out_dir``; returns ``out_dir``."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from common.loading import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden)
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def memory_training(args, work: str, save) -> dict:
    """train.py in a child process at the demo's shape for ``--memory_steps`` steps; its RSS is read from /proc
    whenever metrics.jsonl gains the train record of a step that is a multiple of ``--memory_every`` (the
    child is then between that step and the next). Several ``--memory_heap`` settings run one child each, all
    at once (:data:`HEAP_ARMS`), on the same seed and so the same batches: each has its records, and their step
    times compare window by window. Returns ``{arm: result}``; ``save(results)`` is called after
    every record."""
    import shlex
    import subprocess
    import sys

    from common import heap

    root = os.path.dirname(os.path.abspath(__file__))
    model, extra = args.model, []
    if args.memory_hidden:
        from textdata.word_freq import default_path
        model = small_network(args.model, args.memory_hidden, args.memory_layers, os.path.join(work, "network"))
        extra = ["--word_freq_file", os.path.join(root, default_path(args.model, "bible"))]  # the same tokenizer
    arms = args.memory_heap
    results, procs = {}, {}
    for arm in arms:
        out_dir = os.path.join(work, f"run-{arm}")
        cmd = [sys.executable, os.path.join(root, "train.py"), "--model_name_or_path", model,
               "--max_len", str(args.seq_len), *DEMO_TRAIN_ARGS, "--max_steps", str(args.memory_steps),
               *(["--batch_size", str(args.batch_size)] if args.batch_size else []), "--seed", str(args.seed),
               "--device", "cpu" if args.device == "auto" else args.device, *extra, *shlex.split(args.train_args),
               "--out_dir", out_dir, "--log_dir", os.path.join(out_dir, "logs")]
        env = arm_env(arm, {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                            "TOKENIZERS_PARALLELISM": "false",
                            **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})})
        results[arm] = {"command": " ".join(shlex.quote(c) for c in cmd[1:]), "heap": arm,
                        "heap_env": HEAP_ARMS[arm], "out_dir": out_dir,
                        "network": {"model": args.model, "hidden": args.memory_hidden, "layers": args.memory_layers}
                        if args.memory_hidden else {"model": args.model}, "records": [], "tokens_per_s": {}}
        log = open(os.path.join(work, f"train-{arm}.log"), "w")
        procs[arm] = (subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    start, offsets, done = time.time(), dict.fromkeys(arms, 0), set()
    unchecked = set(arms)  # which malloc each run has, read once, at its first train record
    try:
        while len(done) < len(arms):
            for arm, (proc, log) in procs.items():
                if arm in done:
                    continue
                finished = proc.poll() is not None
                recs, offsets[arm] = new_records(os.path.join(results[arm]["out_dir"], "metrics.jsonl"), offsets[arm])
                for r in recs:
                    if r.get("split") != "train":
                        continue
                    results[arm]["tokens_per_s"][r["step"]] = r.get("tokens_per_s")
                    if arm in unchecked and not finished:
                        unchecked.discard(arm)
                        on = heap.mapped("jemalloc", proc.pid)
                        results[arm]["malloc"] = None if on is None else "jemalloc" if on else "glibc"
                        if arm == "jemalloc" and on is False:
                            raise UserError(f"--memory_heap {arm}: the training run found no jemalloc; install it "
                                            f"(Debian: libjemalloc2) or give its path in ${heap.JEMALLOC_ENV}")
                    if r["step"] % args.memory_every == 0 and not finished:
                        results[arm]["records"].append(rss_record(r["step"], proc.pid, start))
                        save(results)
                if finished:
                    done.add(arm)
                    log.close()
                    results[arm]["seconds"] = time.time() - start
            time.sleep(0.25)
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
            log.close()
    for arm, (proc, log) in procs.items():
        if proc.returncode != 0:
            with open(log.name, errors="replace") as f:
                last = [line.strip() for line in f.read().splitlines() if line.strip()][-1:] or ["(no output)"]
            raise UserError(f"the training run ({arm} heap) failed (exit {proc.returncode}): {last[0]} "
                            f"(log: {log.name})")
    return results


def step_time_ratio(a: dict, b: dict, eval_every: int = 100, log_every: int = 10) -> dict | None:
    """Step time of arm ``a`` over arm ``b`` from their train records' tokens/s (``{step: tokens_per_s}``), window
    by window (the same batches in both: the same seed); the windows that hold a dev evaluation or a save (the
    first after a multiple of ``eval_every``) are left out. The median and quartiles of b/a tokens/s, i.e. of
    a's time per window over b's."""
    import statistics
    ratios = sorted(b[s] / a[s] for s in a if s in b and a[s] and b[s] and (s - log_every) % eval_every != 0)
    if len(ratios) < 4:
        return None
    q = statistics.quantiles(ratios, n=4)
    return {"windows": len(ratios), "median": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def memory_sampling(args, checkpoint: str, save) -> dict:
    """A long sampling run through ``runtime.api`` (predict.py's path): batches of ``--batch_size`` samples with
    ``--sample_steps`` iterations and the cache, with a new seed per batch, until ``--sample_calls`` network
    calls; the RSS of this process is read at every ``--memory_every``-th call."""
    from runtime.api import load

    from common import heap

    arm = args.memory_heap[0]  # parse_args checked that this process can sample under it
    os.environ.update(HEAP_ARMS[arm])  # then as predict.py does at its start
    threshold = heap.fix_mmap_threshold()
    m = load(checkpoint, "cpu" if args.device == "auto" else args.device)
    res = {"checkpoint": checkpoint, "batch_size": args.batch_size or 32, "steps": args.sample_steps,
           "length": args.sample_length or "drawn from the training lengths", "records": [],
           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
           "heap": arm, "malloc": heap.malloc_name(),
           "heap_env": HEAP_ARMS[arm], "mmap_threshold": threshold}
    calls = [0]
    start = time.time()
    reset_peak_rss()

    def count(module, inputs, output):
        calls[0] += 1
        if calls[0] % args.memory_every == 0:
            import gc
            res["records"].append({**rss_record(calls[0], "self", start), "python_objects": len(gc.get_objects())})
            save(res)
    m.run.denoiser.register_forward_hook(count)
    batches = 0
    while calls[0] < args.sample_calls:
        m.sample(res["batch_size"], steps=args.sample_steps, seed=args.seed + batches, batch_size=res["batch_size"],
                 length=args.sample_length)
        batches += 1
    res.update(calls=calls[0], batches=batches, seconds=time.time() - start)
    return res


def bench_memory(args, device: torch.device, clock: Clock, amp) -> dict:
    """``--memory``: training and/or sampling, each with its RSS records and their growth after the warm-up."""
    import tempfile

    res = {"memory_every": args.memory_every}

    def save(_=None):
        if args.json:
            from common.io import write_json_atomic
            write_json_atomic(args.json, {**res, "args": vars(args)})

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        checkpoint = args.checkpoint
        if args.memory in ("train", "both"):
            def phase(arm):  # the first setting is "train", the others beside it "train_<setting>"
                return "train" if arm == args.memory_heap[0] else f"train_{arm}"
            arms = memory_training(args, tmp, lambda rs: (res.update({phase(a): r for a, r in rs.items()}), save()))
            for arm, r in arms.items():
                r["growth"] = {k: growth(r["records"], args.memory_from, k) for k in MEASURES}
                res[phase(arm)] = r
            first = args.memory_heap[0]
            res["step_time_over_first"] = {a: step_time_ratio(arms[a]["tokens_per_s"], arms[first]["tokens_per_s"])
                                           for a in args.memory_heap[1:]}
            checkpoint = checkpoint or next(iter(arms.values()))["out_dir"]
        if args.memory in ("sample", "both"):
            res["sample"] = memory_sampling(args, checkpoint, lambda r: (res.update(sample=r), save()))
            res["sample"]["growth"] = {k: growth(res["sample"]["records"], args.memory_from, k) for k in MEASURES}
    return res


def report_memory(r: dict, args) -> list[str]:
    lines = []
    phases = ["train", *(f"train_{a}" for a in HEAP_ARMS), "sample"]
    for phase, unit in ((p, "network call" if p == "sample" else "step") for p in phases):
        if phase not in r:
            continue
        p = r[phase]
        if "heap" in p:
            how = ", ".join(f"{k}={v}" for k, v in p.get("heap_env", {}).items()) or (
                f"mmap threshold {p['mmap_threshold'] >> 20} MB" if p.get("mmap_threshold") else "as the script sets it")
            lines += [f"heap: {p['heap']} ({how}); malloc: {p.get('malloc') or 'unknown'}", ""]
        objects = any("python_objects" in x for x in p["records"])  # sampling runs in this process: gc counts
        lines += [f"## memory, {phase}: RSS every {args.memory_every} {unit}s", "",
                  f"| {unit} | RSS MB | anonymous | file-backed | peak since the previous record | seconds |"
                  + (" Python objects |" if objects else ""), "|---|---|---|---|---|---|" + ("---|" if objects else "")]
        lines += [f"| {x['step']} | {fmt(x['rss_mb'], 'MB')} | {fmt(x.get('anon_mb'), 'MB')} | "
                  f"{fmt(x.get('file_mb'), 'MB')} | {fmt(x['peak_mb'], 'MB')} | {x['seconds']:.0f} |"
                  + (f" {x.get('python_objects')} |" if objects else "") for x in p["records"]]
        lines.append("")
        for key, what in MEASURES.items():
            if key not in p["growth"]:
                continue
            g = p["growth"][key]
            if g["growth"] is None:
                lines.append(f"- {what}: no record at or after {unit} {args.memory_from}; growth not measured")
                continue
            lines.append(f"- {what}, {unit} {g['from_step']} to {g['to_step']}: **{100 * g['growth']:+.1f}%** "
                         f"({g['base_mb']:.0f} -> {g['end_mb']:.0f} MB; highest {g['max_mb']:.0f} MB, "
                         f"{100 * g['max_growth']:+.1f}%); under 5%: {'yes' if g['growth'] < 0.05 else 'NO'}")
        counted = [x for x in p["records"] if "minor_faults" in x]
        if len(counted) >= 2:
            a, b = counted[0], counted[-1]
            cpu = (b["user_s"] - a["user_s"]) + (b["system_s"] - a["system_s"])
            lines.append(f"- {unit}s {a['step']} to {b['step']}: {(b['minor_faults'] - a['minor_faults']) / (b['step'] - a['step']):,.0f} "
                         f"minor page faults per {unit}; kernel time {100 * (b['system_s'] - a['system_s']) / max(cpu, 1e-9):.1f}% "
                         f"of the CPU time")
        lines.append("")
    first = r.get("train", {}).get("heap")
    for arm, t in r.get("step_time_over_first", {}).items():
        if t:
            lines += [f"- step time, heap {arm} / heap {first}, window by window ({t['windows']} windows of the same "
                      f"batches, side by side): **{t['median']:.3f}x** (quartiles {t['q1']:.3f}-{t['q3']:.3f})", ""]
    return lines


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
    for k in ("floor", "ours", "full_projection", "mdlm", "reference"):
        if k in tr:
            lines.append(f"| {k} | {tr[k]:.3f} | {tr[k] / tr['floor']:.2f}x |")
    lines += ["", f"- training (train mode, dropout on): {tr['tokens_per_s']:.0f} tokens/s; step / floor = "
              f"**{tr['ours'] / tr['floor']:.2f}**"
              + (f"; reference / ours = **{tr['reference'] / tr['ours']:.2f}x**" if "reference" in tr else "")
              + f"; full projection / ours = {tr['full_projection'] / tr['ours']:.2f}x"
              + f"; MDLM / ours = **{tr['mdlm'] / tr['ours']:.2f}x**"]
    if "kl_fast_vs_dense_rel_diff" in r:
        lines.append(f"- the fast bound against the dense [B, L, V] one (same x_t, t, logits): relative difference "
                     f"{r['kl_fast_vs_dense_rel_diff']:.1e}")
    lines += ["", f"| sampling, {sm['steps']} steps, {args.batch_size} sequences | seconds | network calls | rows/seq "
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
            f"training (train mode, dropout on) {tr['tokens_per_s']:.0f} tokens/s; peak memory: "
            + ", ".join(f"{k} {fmt(v, 'MB')}" for k, v in r["memory_mb"].items())]


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets; the first name that the
# device's name contains wins (so "H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4")
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
                    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0))


def peak_tflops(device_name: str) -> float | None:
    """The card's bf16 peak from :data:`PEAK_BF16_TFLOPS` (fp16 for V100/T4, which have no bf16), or None."""
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device_name), None)


def throughput(r: dict, args, env: dict) -> dict:
    """Training steps/s and tokens/s of ``ours``, its model FLOPs utilisation, and sampled sequences/s.

    Model FLOPs per trained token: ``6 N + 12 layers * hidden * seq_len`` (N parameters; the second term is
    attention's score and value products; PaLM, appendix B), the count of a dense masked-LM step. Our absorbing
    step projects onto the vocabulary at the masked positions only, so it does less work than it is credited
    with here: its MFU is the utilisation of an equivalent dense step."""
    step = r["train"]["ours"]
    tokens = args.batch_size * args.seq_len
    flops = (6 * r["parameters"] + 12 * r["layers"] * r["hidden"] * args.seq_len) * tokens / step
    peak = peak_tflops(env["device"]) if env["device_type"] == "cuda" else None
    if args.process == "absorbing":
        seconds, what = r["sample"]["cache_on"]["seconds"], f"{r['sample']['steps']} steps"
    else:
        seconds, what = r["decode_adp_20"]["seconds"], "adp_20"
    return {"train_steps_per_s": 1.0 / step, "train_tokens_per_s": tokens / step, "model_tflops": flops / 1e12,
            "peak_tflops": peak, "mfu": flops / 1e12 / peak if peak else None,
            "sample_sequences_per_s": args.batch_size / seconds, "sample_setting": what,
            "peak_memory_mb": max((v for v in r["memory_mb"].values() if v is not None), default=None)}


def report_throughput(t: dict) -> list[str]:
    mfu = f"{100 * t['mfu']:.1f}% of {t['peak_tflops']:.0f}" if t["mfu"] is not None else "n/a (no peak for this device)"
    return ["", f"throughput: training {t['train_steps_per_s']:.2f} steps/s, {t['train_tokens_per_s']:.0f} tokens/s, "
                f"{t['model_tflops']:.1f} model TFLOP/s (MFU {mfu}); sampling ({t['sample_setting']}) "
                f"{t['sample_sequences_per_s']:.2f} sequences/s; peak memory {fmt(t['peak_memory_mb'], 'MB')}"]


# per process: the paper's T, the measurements, the report
BENCHES = {"absorbing": (2048, bench_absorbing, report_absorbing), "gaussian": (2000, bench_gaussian, report_gaussian),
           "memory": (2048, bench_memory, report_memory)}


@cli_main
def main(argv=None):
    args = parse_args(argv)
    from runtime.dist import pick_device

    device = pick_device(args.device)
    from runtime.training import compile_problem
    if args.compile and (problem := compile_problem(device)):
        raise UserError(f"--compile: {problem}")
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

    default_T, bench, report = BENCHES["memory" if args.memory else args.process]
    if args.seq2seq_padding:
        if args.process != "absorbing" or args.memory:
            raise UserError("--seq2seq_padding measures the absorbing process (DiffuSeq keeps its fixed canvas), "
                            "without --memory")
        default_T, bench, report = 2000, bench_seq2seq_padding, report_seq2seq_padding
    if args.num_steps is None:
        args.num_steps = default_T
    torch.manual_seed(args.seed)
    clock = Clock(device)
    start = time.time()
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "bf16": use_bf16, "compile": args.compile}
    res = bench(args, device, clock, amp)
    lines = report(res, args)
    if not args.memory and not args.seq2seq_padding:  # the timing tables only
        res["throughput"] = throughput(res, args, env)
        lines += report_throughput(res["throughput"])
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
