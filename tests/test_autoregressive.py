"""The autoregressive baseline (``--process autoregressive``): the causal mask, the exact NLL against a brute-force
sum over prefixes, the sampler against hand-derived draws (top-p, temperature, the end token), batch-size
invariance, and one run through train.py, compute_elbo.py and predict.py. Tiny models, CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli, run_here
from diffusion import SampleNoise
from diffusion.autoregressive import Autoregressive
from diffusion.noise import STREAM_TOKEN
from runtime import api, dist
from runtime.assemble import PROCESS_PARTS, Loaded, build_diffusion
from runtime.config import TrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")
MAX_LEN = 12


def tiny_ar(tok, max_len: int = MAX_LEN) -> api.Model:
    """A tiny untrained AR checkpoint, built as load_for_inference builds one (its network made causal)."""
    from transformers import BertConfig
    torch.manual_seed(0)
    cfg = TrainConfig(process="autoregressive", max_len=max_len)
    hf = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=32)
    net = PROCESS_PARTS["autoregressive"].build_network(cfg, hf, tok).eval()
    run = Loaded("tiny/checkpoints/best", cfg, {"derived": {}}, tok, net, build_diffusion(cfg, None, None, None, tok))
    return api.Model(run, dist.DistInfo())


@pytest.fixture(scope="module")
def ar(tok):
    return tiny_ar(tok)


def logits_of(model: api.Model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.run.denoiser(x, None, torch.ones_like(x), None)


# ---------------------------------------------------------------- the causal mask

def test_a_future_token_never_changes_the_logits_before_it(ar, tok):
    """Brute force: for every cut j, redraw every token after j; the logits at 0..j stay (bitwise close), those
    after j move. The same check on the bidirectional network of the same weights fails, so it can fail."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1000, 20000, (3, 10), generator=g)
    x[:, 0] = tok.cls_token_id
    base = logits_of(ar, x)
    for j in range(9):
        y = x.clone()
        y[:, j + 1:] = torch.randint(1000, 20000, (3, 9 - j), generator=g)
        out = logits_of(ar, y)
        torch.testing.assert_close(out[:, :j + 1], base[:, :j + 1], rtol=0, atol=1e-5)
        assert (out[:, j + 1:] - base[:, j + 1:]).abs().max() > 1e-3
    from transformers import AutoModelForMaskedLM
    cfg = ar.run.denoiser.mlm.config.to_dict()
    bidirectional = AutoModelForMaskedLM.from_config(type(ar.run.denoiser.mlm.config)(**{**cfg, "is_decoder": False}))
    bidirectional.load_state_dict(ar.run.denoiser.mlm.state_dict())
    y = x.clone()
    y[:, 5:] = 1996
    with torch.no_grad():
        a, b = (bidirectional(input_ids=z).logits for z in (x, y))
    assert (a[:, :5] - b[:, :5]).abs().max() > 1e-3


# ---------------------------------------------------------------- the exact NLL

def brute_force_nll(model: api.Model, row: list[int], max_len: int) -> float:
    """-log p(row) by running the network on every prefix alone: the softmax over the vocabulary less [CLS],
    [PAD] and [MASK]; the [SEP] at position max_len - 1 is forced (not scored)."""
    tok, total = model.tokenizer, 0.0
    never = [tok.cls_token_id, tok.pad_token_id, tok.mask_token_id]
    for j in range(1, len(row)):
        if j == max_len - 1 and row[j] == tok.sep_token_id:
            continue
        logits = logits_of(model, torch.tensor([row[:j]]))[0, -1].double()
        logits[never] = -math.inf
        total -= float(logits.log_softmax(-1)[row[j]])
    return total


def test_the_exact_nll_is_the_sum_over_prefixes(ar, tok):
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    rows = [[cls, 2023, 2003, sep],
            [cls, 1999, 1996, 2927, 2643, 2580, sep],
            [cls, sep],  # the empty text: its [SEP] is scored
            [cls, *range(2000, 2000 + MAX_LEN - 2), sep]]  # the full canvas: its [SEP] is forced
    L = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])
    att = (torch.arange(L)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    got = ar.run.diffusion.nll(lambda x, a, p: ar.run.denoiser(x, None, a, p), ids, att)
    want = torch.tensor([brute_force_nll(ar, r, MAX_LEN) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    loss = ar.run.diffusion.loss(lambda x, a, p: ar.run.denoiser(x, None, a, p), ids, att)
    assert int(loss.num_scored) == 3 + 6 + 1 + (MAX_LEN - 2)  # every wordpiece, and [SEP] but the forced one
    torch.testing.assert_close(float(loss.loss.detach()), float(want.sum()) / int(loss.num_scored), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the sampler, on a hand-made distribution

V = 10
PAD, CLS, SEP, MASK = 0, 1, 2, 3
# p(. | prefix) of the words 4..9 and [SEP]; [PAD], [CLS], [MASK] get large logits that must never count
P_WORDS = {4: 0.5, 5: 0.3, 6: 0.1, 7: 0.05, SEP: 0.05}


def fixed_network(x: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    logits = torch.full((int(positions.sum()), V), -1e9)
    for tok_id, p in P_WORDS.items():
        logits[:, tok_id] = math.log(p)
    logits[:, [PAD, CLS, MASK]] = 5.0
    return logits


def nucleus(probs: dict, top_p: float, temperature: float) -> dict:
    """The kept tokens and their probabilities, by hand: p^(1/T) renormalised, then the most likely tokens until
    the mass before the next one reaches top_p."""
    q = {k: v ** (1 / temperature) for k, v in probs.items()}
    z = sum(q.values())
    kept, before = {}, 0.0
    for k, v in sorted(q.items(), key=lambda kv: -kv[1]):
        if before >= top_p:
            break
        kept[k], before = v / z, before + v / z
    s = sum(kept.values())
    return {k: v / s for k, v in kept.items()}


@pytest.mark.parametrize("top_p,temperature,kept", [(0.75, 1.0, {4, 5}), (0.75, 2.0, {4, 5, 6}),
                                                    (1.0, 1.0, {4, 5, 6, 7, SEP})])
def test_top_p_and_temperature_draw_from_the_hand_derived_nucleus(top_p, temperature, kept):
    proc = Autoregressive(SEP, [PAD, CLS, MASK], max_len=8)
    dist_ = nucleus(P_WORDS, top_p, temperature)
    assert set(dist_) == kept  # the hand derivation itself: 0.5 + 0.3 reaches 0.75; at T=2, .35+.27+.16 does
    B = 40
    ids = torch.full((B, 8), MASK)
    ids[:, 0] = CLS
    gen = torch.zeros(B, 8, dtype=torch.bool)
    gen[:, 1:] = True
    out = proc.sample(fixed_network, ids, gen, SampleNoise(7, range(B)), top_p=top_p, temperature=temperature,
                      pad_id=PAD)
    order = sorted(dist_)  # the inverse CDF walks the vocabulary in id order
    u_all = {j: SampleNoise(7, range(B)).uniform(j, STREAM_TOKEN, 1)[:, 0].tolist() for j in range(1, 8)}
    for b in range(B):
        for j in range(1, 8):
            x = int(out.x0[b, j])
            if j > 1 and int(out.x0[b, j - 1]) in (SEP, PAD):
                assert x == PAD
                continue
            if j == 7:
                assert x == SEP  # the canvas is full: the end is forced
                continue
            u, cum = u_all[j][b], 0.0
            want = next(k for k in order if u < (cum := cum + dist_[k])) if u < 1 else order[-1]
            assert x == want, (b, j, u)
    lengths = [next(j for j in range(1, 8) if int(out.x0[b, j]) == SEP) for b in range(B)]
    assert out.row_evaluations == sum(min(n, 6) for n in lengths)  # one call per drawn token; the forced end free
    assert out.network_calls == min(max(lengths), 6)


def test_rows_end_where_they_draw_the_end_and_prompts_stay(tok):
    """A network that puts all its mass on [SEP] once the prefix holds a token 9: each row runs until then."""
    def net(x, att, pos):
        logits = torch.full((x.shape[0], V), -1e9)
        logits[:, 9] = 0.0
        logits[(x == 9).any(1), SEP] = 1e9
        return logits
    proc = Autoregressive(SEP, [PAD, CLS, MASK], max_len=8)
    ids = torch.tensor([[CLS, 4, 9, MASK, MASK, MASK], [CLS, 5, MASK, MASK, MASK, MASK]])
    gen = ids == MASK
    out = proc.sample(net, ids, gen, SampleNoise(0, [0, 1]), pad_id=PAD)
    assert out.x0.tolist() == [[CLS, 4, 9, SEP, PAD, PAD], [CLS, 5, 9, SEP, PAD, PAD]]
    assert (out.network_calls, out.row_evaluations) == (2, 3)


# ---------------------------------------------------------------- through the API

def test_samples_do_not_depend_on_the_batch(ar):
    """Sample i is a function of (seed, i): the same strings with batch sizes 1, 7 and 16, rows ending at
    different lengths, with and without a prompt (top-p 1: see docs/algorithms.md for the nucleus's ties)."""
    for kw in (dict(temperature=0.8), dict(topk=50, prompt="in the beginning")):
        runs = [ar.sample(16, seed=3, batch_size=b, **kw) for b in (1, 7, 16)]
        assert runs[0] == runs[1] == runs[2]
        assert len(set(runs[0])) == 16
        if "prompt" in kw:
            assert all(s.startswith("in the beginning") for s in runs[0])


@pytest.mark.parametrize("kwargs,needle", [(dict(steps=4), "steps"), (dict(sampler="confidence"), "sampler"),
                                           (dict(length=5), "length"), (dict(top_p=0.0), "top_p"),
                                           (dict(temperature=0.0), "temperature"), (dict(respacing="adp_5"), "respacing")])
def test_the_api_refuses_diffusion_settings(ar, kwargs, needle):
    from common.errors import UserError
    with pytest.raises(UserError, match=needle):
        ar.sample(2, **kwargs)


def test_a_template_is_refused(ar):
    from common.errors import UserError
    with pytest.raises(UserError, match="autoregressive.*prompt"):
        ar.infill(["the [MASK] of god"])


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def ar_run(tmp_path_factory, tiny_bert, tiny_corpus):
    cwd = tmp_path_factory.mktemp("ar")
    run = cwd / "run"
    run_cli("train.py", "--process", "autoregressive", "--model_name_or_path", tiny_bert, "--dataset", "text",
            "--data_files", tiny_corpus, "--max_len", "24", "--batch_size", "8", "--eval_examples", "8",
            "--lr", "1e-3", "--warmup_steps", "0", "--decay", "constant", "--max_steps", "2", "--eval_every", "2",
            "--save_every", "2", "--log_every", "1", "--out_dir", str(run), "--log_dir", str(cwd / "logs"), cwd=str(cwd))
    return cwd, run


@pytest.mark.slow
def test_train_compute_elbo_and_predict_through_the_cli(ar_run, tiny_corpus):
    from runtime.api import load
    cwd, run = ar_run
    info = json.load(open(run / "checkpoints" / "last" / "run_config.json"))
    assert info["config"]["process"] == "autoregressive" and info["latest_dev"]["nll_per_token"] > 0
    assert json.load(open(run / "checkpoints" / "last" / "config.json"))["is_decoder"] is True
    assert (run / "plots" / "dev.png").is_file()  # the exact NLL drawn as the dev figure
    out = cwd / "nll.json"
    proc = run_here("compute_elbo.py", "--checkpoint", str(run), "--num_examples", "0", "--batch_size", "16",
                    "--eval_steps", "8", "--seed", "0", "--device", "cpu", "--out", str(out), "--overwrite", cwd=str(cwd))
    assert proc.returncode == 0, proc.stderr
    assert "exact NLL" in proc.stdout and "NELBO" not in proc.stdout
    res = json.load(open(out))
    assert res["bound"] is False and res["estimator"] == "exact" and res["eval_steps"] is None
    # the oracle: every test line, tokenised as the data is, scored prefix by prefix
    m = load(str(run), "cpu")
    lines = [l.strip() for l in open(f"{tiny_corpus}/test.txt", encoding="utf-8") if l.strip()]
    rows = [m.tokenizer(l)["input_ids"] for l in lines]
    words = sum(len(l.split()) if len(r) <= 24 else len(m.tokenizer.decode(r[:23], skip_special_tokens=True).split())
                for l, r in zip(lines, rows))  # a long line is cut to 23 wordpieces and [SEP]
    rows = [r if len(r) <= 24 else r[:23] + [m.tokenizer.sep_token_id] for r in rows]
    assert res["tokens"] == sum(len(r) - 2 for r in rows) and res["words"] == words
    want = sum(brute_force_nll(m, r, 24) for r in rows)
    assert res["nll"] == pytest.approx(want, rel=1e-5)
    assert res["nelbo_per_token"] == res["nll_per_token"] == pytest.approx(want / res["tokens"], rel=1e-5)
    assert res["ppl_token"] == pytest.approx(math.exp(want / res["tokens"]), rel=1e-5)
    gen = cwd / "gen"
    for b in ("1", "5"):
        proc = run_here("predict.py", "--checkpoint", str(run), "--num_samples", "6", "--temperature", "1.0",
                        "--top_p", "1.0", "--batch_size", b, "--seed", "1", "--device", "cpu", "--out_dir", str(gen),
                        "--name", f"b{b}", "--overwrite", cwd=str(cwd))
        assert proc.returncode == 0, proc.stderr
    assert (gen / "b1.txt").read_text() == (gen / "b5.txt").read_text()
    meta = json.load(open(gen / "b5.json"))
    assert meta["process"] == "autoregressive" and meta["kv_cache"] is False
    assert meta["calls_per_sequence"] == meta["row_evaluations"] / 6 and meta["sequences_per_second"] > 0
    assert (gen / "b5.txt").read_text().splitlines() == m.sample(6, seed=1, batch_size=5)
