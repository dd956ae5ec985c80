"""Fixed positions on the canvas (runtime.canvas, runtime.api): templates, prompts, lengths and seq2seq sources.

Tiny untrained models built by hand (``Loaded`` without a checkpoint; the gaussian lm cannot be trained by
train.py yet), so a given token can only survive because the sampler never touches it. The oracles are the
test's own: the templates' and prompts' tokenisation done here, the training collators (the layout a process
was trained on), and the wordpieces counted between [CLS] and the first [SEP]/[PAD] of each generated canvas.
"""
from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from runtime import api, dist
from runtime.assemble import Loaded, build_denoiser, build_diffusion, build_gaussian_denoiser
from runtime.canvas import SLOT, Row, lay_out
from runtime.config import TrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_LEN = 16
TEMPLATES = ["the [MASK] [MASK] of the lord [MASK]", "[MASK] and god said", "[MASK] [MASK] [MASK] [MASK]"]
PROMPT = "in the beginning"


def build(tok, process: str, task: str = "lm", **flags) -> api.Model:
    """A tiny untrained checkpoint of ``process`` and ``task`` (the config built directly, not checked; ``flags``:
    other TrainConfig fields)."""
    torch.manual_seed(0)
    cfg = TrainConfig(task=task, process=process, max_len=MAX_LEN, num_steps=20, emb_dim=8, hidden_size=16,
                      num_layers=1, num_heads=2, dropout=0.0, schedule="sqrt" if process == "gaussian" else "mutual",
                      **flags)
    if process == "gaussian":
        net = build_gaussian_denoiser(cfg, len(tok))
    else:
        from transformers import BertConfig, BertForMaskedLM
        mlm = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=MAX_LEN))
        net = build_denoiser(cfg, mlm, tok)
    counts = [0, 0, 1, 2, 3, 2, 1, 1, 1, 0, 1, 0, 0, 0, 0]  # training lengths 2..10 (index n: n wordpieces)
    run = Loaded("tiny/checkpoints/best", cfg, {"derived": {"length_counts": counts}}, tok, net.eval(),
                 build_diffusion(cfg, tok.mask_token_id, tok.pad_token_id))
    return api.Model(run, dist.DistInfo())


@pytest.fixture(scope="module")
def models(tok):
    return {p: build(tok, p) for p in ("absorbing", "gaussian")}


def options(process: str) -> dict:
    return {"steps": 6} if process == "absorbing" else {"respacing": "uniform_5"}


def text_of(canvas: list[int], tok) -> list[int]:
    """The wordpieces between [CLS] (position 0) and the first [SEP] or [PAD]: the oracle's count."""
    assert canvas[0] == tok.cls_token_id
    end = next(i for i, x in enumerate(canvas + [tok.sep_token_id]) if x in (tok.sep_token_id, tok.pad_token_id))
    return canvas[1:end]


def words(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the canvas is the one the process was trained on

def test_rows_lay_out_as_the_training_collators(tok):
    from conditional_data import PairCollator
    from textdata.lm import collator_for
    cls, sep, pad, mask = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id
    # absorbing lm: [CLS] SLOT*n [SEP], as the lm collator pads and masks a line of n wordpieces
    lines = [words(tok, t) for t in ("and god said", "let there be light and there was light", "amen")]
    want = collator_for(tok)([{"input_ids": [cls, *w, sep]} for w in lines])
    ids, att, noise = lay_out([Row((cls, *[SLOT] * len(w), sep)) for w in lines], pad, mask)
    assert torch.equal(att, want["attention_mask"]) and torch.equal(noise, want["noise_mask"])
    assert torch.equal(ids[~noise], want["input_ids"][~noise]) and (ids[noise] == mask).all()
    # seq2seq: [CLS] src [SEP] fixed and the rest of the canvas generated, as PairCollator with an empty target
    srcs = [[cls, *w, sep] for w in lines]
    want = PairCollator(pad, canvas_len=MAX_LEN)([{"src_ids": s, "trg_ids": []} for s in srcs])
    ids, att, noise = lay_out(api.Model.source_rows(srcs), pad, mask, MAX_LEN)
    assert torch.equal(att, want["attention_mask"]) and torch.equal(noise, want["noise_mask"])
    assert torch.equal(ids[~noise], want["input_ids"][~noise])
    # gaussian lm: [CLS] fixed and every other position generated, as its training canvas; a length also fixes
    # the [SEP] and the [PAD]s
    from textdata.lm import CanvasCollator
    want = CanvasCollator(pad, MAX_LEN)([{"input_ids": [cls, *w, sep]} for w in lines])
    ids, att, noise = lay_out([Row((cls,), open=True)] * 3, pad, mask, MAX_LEN)
    assert torch.equal(att, want["attention_mask"]) and torch.equal(noise, want["noise_mask"])
    assert torch.equal(ids[~noise], want["input_ids"][~noise])
    ids, att, noise = lay_out([Row((cls, SLOT, SLOT, sep))], pad, mask, 6)
    assert noise.tolist() == [[False, True, True, False, False, False]]
    assert ids[0].tolist() == [cls, mask, mask, sep, pad, pad] and att.all()


# ---------------------------------------------------------------- given tokens never change

@pytest.mark.parametrize("process", ["absorbing", "gaussian"])
def test_templates_keep_every_given_token(models, tok, process):
    m = models[process]
    out = m.generate(m.template_rows(TEMPLATES, num_samples=2), m.decoding(**options(process)), seed=1, batch_size=4)
    assert len(out.texts) == 2 * len(TEMPLATES) and out.network_calls > 0
    for k, (text, canvas) in enumerate(zip(out.texts, out.canvases)):
        template = [None if i == tok.mask_token_id else i for i in words(tok, TEMPLATES[k // 2])]
        got = text_of(canvas, tok)
        assert len(got) == len(template)  # the [SEP] stays where the template ends
        assert all(g == t for g, t in zip(got, template) if t is not None)
        assert all(g not in tok.all_special_ids for g in got)
        assert text == " ".join(tok.decode(got).split())
        if process == "gaussian":  # a fixed canvas: [PAD] after the [SEP]
            assert canvas[len(got) + 1:] == [tok.sep_token_id] + [tok.pad_token_id] * (MAX_LEN - len(got) - 2)
    assert " of the lord " in out.texts[0] and out.texts[2].endswith(" and god said")


def test_a_template_without_mask_is_its_own_output(models, tok):
    for process, m in models.items():
        out = m.generate(m.template_rows(["In the Beginning", "amen"], 2), m.decoding(**options(process)), batch_size=3)
        assert out.texts == ["in the beginning"] * 2 + ["amen"] * 2 and out.network_calls == 0


@pytest.mark.parametrize("process", ["absorbing", "gaussian"])
def test_prompt_and_length_list(models, tok, process):
    m = models[process]
    given, lengths = words(tok, PROMPT), [4, 7, 11]
    rows = m.lm_rows(7, length=lengths, prompt=PROMPT)
    out = m.generate(rows, m.decoding(**options(process)), seed=2, batch_size=3)
    for i, (text, canvas) in enumerate(zip(out.texts, out.canvases)):
        got = text_of(canvas, tok)
        assert len(got) == lengths[i % 3], (i, canvas)
        assert got[:len(given)] == given and text.startswith(PROMPT)
        assert not set(got) & set(tok.all_special_ids)
    # and through sample(): the same rows, the same strings
    assert m.sample(7, length=lengths, prompt=PROMPT, seed=2, batch_size=3, **options(process)) == out.texts


@pytest.mark.parametrize("process", ["absorbing", "gaussian"])
def test_length_is_met_exactly(models, tok, process):
    m = models[process]
    out = m.generate(m.lm_rows(6, length=[1, 5, 14]), m.decoding(**options(process)), seed=3, batch_size=4)
    assert [len(text_of(c, tok)) for c in out.canvases] == [1, 5, 14] * 2
    assert all(not set(text_of(c, tok)) & set(tok.all_special_ids) for c in out.canvases)
    assert [len(t.split()) > 0 for t in out.texts] == [True] * 6


class SaysPad:
    """A DiffuSeq denoiser that predicts the [PAD] embedding everywhere: a gaussian lm that would end every text
    at once (a trained one puts [PAD] after its [SEP], so a slot is never far from it)."""

    def __init__(self, net, pad_id: int):
        self.net, self.pad_id = net, pad_id
        self.embed, self.embedding_weight = net.embed, net.embedding_weight

    def __call__(self, z_t, t):
        return self.net.embedding_weight[self.pad_id].detach().expand_as(z_t)


def test_gaussian_length_holds_against_a_model_that_would_stop(tok):
    m = build(tok, "gaussian")
    m.run.denoiser = SaysPad(m.run.denoiser, tok.pad_token_id)
    # open-ended it stops at once: every generated position is [PAD], the text is the prompt alone
    out = m.generate(m.lm_rows(2, prompt=PROMPT), m.decoding(respacing="uniform_3"))
    given = words(tok, PROMPT)
    assert out.texts == [PROMPT] * 2 and out.canvases[0] == [tok.cls_token_id, *given] + [tok.pad_token_id] * 12
    # with a length or a template its end is fixed, and the slots are words all the same
    for rows in (m.lm_rows(3, length=[6, 2, 14], prompt="in"), m.template_rows(["[MASK] and [MASK]"])):
        out = m.generate(rows, m.decoding(respacing="uniform_3"))
        for row, canvas in zip(rows, out.canvases):
            got = text_of(canvas, tok)
            assert len(got) == len(row.cells) - 2 and not set(got) & set(tok.all_special_ids), canvas


def test_open_ended_prompts(models, tok):
    given = words(tok, PROMPT)
    # absorbing: lengths from the training prior (2..10 wordpieces here) conditioned on being longer than the prompt
    m = models["absorbing"]
    out = m.generate(m.lm_rows(12, prompt=PROMPT, seed=4), m.decoding(steps=4), seed=4)
    counts = [len(text_of(c, tok)) for c in out.canvases]
    assert all(len(given) < n <= 10 for n in counts) and len(set(counts)) > 1
    assert all(text_of(c, tok)[:len(given)] == given for c in out.canvases)
    # gaussian: [CLS] prompt, then the model places [SEP]; the prompt is kept
    m = models["gaussian"]
    out = m.generate(m.lm_rows(4, prompt=PROMPT), m.decoding(respacing="uniform_4"), seed=4)
    assert all(c[1:len(given) + 1] == given and len(c) == MAX_LEN for c in out.canvases)
    assert all(t.startswith(PROMPT) for t in out.texts)
    # unconditional: [CLS] then all generated, the text ends at the first [SEP] or [PAD]
    texts = m.sample(3, respacing="uniform_4", seed=5)
    assert len(texts) == 3 and texts == m.sample(3, respacing="uniform_4", seed=5)


def test_gaussian_seq2seq_source_is_kept(tok):
    m = build(tok, "gaussian", task="seq2seq")
    sources = ["in the beginning god created", "and the earth was without form"]
    src = [[tok.cls_token_id, *words(tok, s), tok.sep_token_id] for s in sources]
    out = m.decode_batches(src, m.decoding(respacing="uniform_3"), seed=1)
    assert [c[:len(s)] for c, s in zip(out.canvases, src)] == src
    assert out.texts == m.decode(sources, respacing="uniform_3", seed=1)
    with pytest.raises(UserError, match="infill\\(\\) is for lm checkpoints; give it sources with decode"):
        m.infill(TEMPLATES)


# ---------------------------------------------------------------- bad requests: one UserError line

@pytest.mark.parametrize("process, call, needles", [
    ("absorbing", lambda m: m.infill(["the ☃ [MASK]"]), ("template 0", "'☃' is not in", "[UNK]")),
    ("gaussian", lambda m: m.sample(2, prompt="zzz ☃"), ("prompt", "'☃' is not in")),
    ("absorbing", lambda m: m.infill(["the [MASK] " * 8]), ("template 0 is 16 wordpieces", "at most 14")),
    ("gaussian", lambda m: m.infill(["[MASK] [MASK] [MASK]"], length=4), ("length 4 conflicts", "3 wordpieces")),
    ("absorbing", lambda m: m.infill(["[MASK] [MASK]", "a [MASK]"], length=[2, 3]), ("length 2,3 conflicts",)),
    ("gaussian", lambda m: m.sample(2, prompt=PROMPT, length=[3, 9]), ("length 3", "no room")),
    ("absorbing", lambda m: m.sample(2, prompt="and " * 14), ("14 wordpieces", "no room")),
    ("gaussian", lambda m: m.infill(["amen [SEP] [MASK]"]), ("special token [SEP]",)),
    ("absorbing", lambda m: m.infill(["[CLS] [MASK]"]), ("special token [CLS]",)),
    ("absorbing", lambda m: m.sample(2, prompt="in the [MASK]"), ("special token [MASK]", "template")),
    ("absorbing", lambda m: m.infill("the [MASK]"), ("templates must be a list of strings",)),
    ("absorbing", lambda m: m.infill(["  "]), ("template 0 is empty",)),
    ("gaussian", lambda m: m.sample(2, steps=10), ("respacing='uniform_10'",)),
    ("gaussian", lambda m: m.infill(["[MASK]"], topk=3), ("absorbing-sampler",)),
    ("gaussian", lambda m: m.sample(2, max_len=8), ("max_len is for absorbing",)),
    ("absorbing", lambda m: m.sample(2, respacing="adp_5"), ("respacing and weights are for gaussian",)),
    ("absorbing", lambda m: m.sample(2, length=[3, 0]), ("length must be at least 1", "got 0")),
    ("absorbing", lambda m: m.sample(2, length="8"), ("length must be a number of wordpieces",)),
])
def test_bad_requests_are_one_user_error(models, process, call, needles):
    with pytest.raises(UserError) as e:
        call(models[process])
    message = str(e.value)
    assert "\n" not in message and "--" not in message, message
    for n in needles:
        assert n in message, message


@pytest.mark.slow
def test_predict_py_templates_prompts_and_refusals(lm_run, tmp_path):
    """The flags through the real script (in this process): a template's given words and a prompt survive in
    the file, the json records the settings, and each bad flag is one error line with exit status 2."""
    import json

    from conftest import one_error_line, run_here
    gen = tmp_path / "gen"
    base = ("predict.py", "--checkpoint", str(lm_run[2]), "--steps", "4", "--out_dir", str(gen))
    (tmp_path / "templates.txt").write_text("the [MASK] of the lord\n\nand god said\n", encoding="utf-8")
    p = run_here(*base, "--template_file", str(tmp_path / "templates.txt"), "--num_samples", "2", "--name", "t",
                 cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    lines = (gen / "t.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and lines[2:] == ["and god said"] * 2  # per template, template-major; no blank template
    assert all(line.startswith("the") and line.endswith(" of the lord") for line in lines[:2]), lines
    meta = json.load(open(gen / "t.json"))
    assert meta["templates"] == ["the [MASK] of the lord", "and god said"] and meta["steps"] == 4
    p = run_here(*base, "--prompt", PROMPT, "--length", "5,7", "--num_samples", "3", "--name", "p", cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert all(line.startswith(PROMPT) for line in (gen / "p.txt").read_text(encoding="utf-8").splitlines())
    assert json.load(open(gen / "p.json"))["length"] == [5, 7]

    for flags, needles in [
        (("--template", "the ☃ [MASK]"), ("'☃' is not in",)),
        (("--template", "[MASK] [MASK]", "--length", "3"), ("--length 3 conflicts",)),
        (("--template", "[MASK]", "--prompt", "amen"), ("--template and --prompt",)),
        (("--prompt", "and " * 30), ("30 wordpieces", "no room")),
        (("--template", "amen [SEP] [MASK]"), ("special token [SEP]",)),
        (("--template", "the [MASK] " * 16), ("template 0 is 32 wordpieces", "at most 30")),
        (("--length", "8,x"), ("--length must be",)),
        (("--decode_respacing", "adp_5"), ("--decode_respacing and --weights are for gaussian",)),
    ]:
        one_error_line(run_here(*base, *flags, cwd=str(tmp_path)), *needles)
    assert sorted(f.name for f in gen.iterdir()) == ["p.json", "p.txt", "t.json", "t.txt"]


@pytest.mark.slow
def test_predict_py_on_a_trained_gaussian_lm(gauss_lm_run, tok):
    """predict.py end to end on a Diffusion-LM checkpoint from train.py: unconditional with --decode_respacing,
    a prompt with lengths and a template; the lines are the API's, and the absorbing flags are refused."""
    import json

    from conftest import one_error_line, run_here
    from runtime.api import load
    cwd, run = gauss_lm_run
    gen = cwd / "gen_infill"
    base = ("predict.py", "--checkpoint", str(run), "--decode_respacing", "uniform_5", "--batch_size", "3",
            "--out_dir", str(gen))
    p = run_here(*base, "--num_samples", "4", cwd=str(cwd))
    assert p.returncode == 0, p.stderr
    name = "run_best_respacinguniform_5_n4_seed42"
    lines = (gen / f"{name}.txt").read_text(encoding="utf-8").splitlines()
    meta = json.load(open(gen / f"{name}.json"))
    assert meta["process"] == "gaussian" and meta["timesteps"] == [0, 25, 50, 74, 99] and meta["network_calls"] == 2 * 5  # two batches
    m = load(str(run))
    assert lines == m.sample(4, respacing="uniform_5", batch_size=3)
    assert run_here(*base, "--num_samples", "3", "--prompt", PROMPT, "--length", "6,9", "--name", "p",
                    cwd=str(cwd)).returncode == 0
    assert all(line.startswith(PROMPT) for line in (gen / "p.txt").read_text(encoding="utf-8").splitlines())
    out = m.generate(m.lm_rows(3, length=[6, 9], prompt=PROMPT), m.decoding(respacing="uniform_5"), batch_size=3)
    assert [len(text_of(c, tok)) for c in out.canvases] == [6, 9, 6]
    assert (gen / "p.txt").read_text(encoding="utf-8") == "".join(t + "\n" for t in out.texts)
    assert run_here(*base, "--template", "[MASK] and god said [MASK]", "--name", "t", cwd=str(cwd)).returncode == 0
    (line,) = (gen / "t.txt").read_text(encoding="utf-8").splitlines()
    assert " and god said " in f" {line} "
    one_error_line(run_here(*base, "--steps", "10", cwd=str(cwd)), "--decode_respacing uniform_10")
    one_error_line(run_here(*base, "--topk", "3", cwd=str(cwd)), "absorbing-sampler flags")
    one_error_line(run_here(*base, "--max_len", "20", cwd=str(cwd)), "--max_len is for absorbing")
    one_error_line(run_here(*base, "--decode_respacing", "adp_500", cwd=str(cwd)), "--decode_respacing: ")
