"""Bad flags, in every script that takes them: each row is one command line that must stop with exit status 2
and one ``error:`` line naming what is wrong, and no traceback (issue 24, part 4). The table holds the
inputs of the issue (--device cuda without CUDA and --device tpu9 in every script with --device, --lr nan,
an --out_dir that is a file, a Gaussian --max_len beyond memory, --mode compare given a file) and the other
invalid inputs found by trying: counts below their minimum, nonsense choices, missing files, malformed JSON
lines, conflicting flags, non-finite weights.

The rows run in this process (``conftest.run_here``: the real script's ``main`` and exit status, without an
interpreter start per row); the first row of each script also runs as a real subprocess. Most rows stop at the
flag checks, before any network is loaded; the checkpoint rows load a tiny one written in a second
(tests/bad_flag_inputs.py), never trained."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.bad_flag_inputs import NAN_TENSOR, make_inputs
from tests.conftest import one_error_line, run_cli, run_here, run_together

CUDA = torch.cuda.is_available()

# train.py rows share these (a tiny BERT and corpus, a few steps): a row that is wrongly accepted trains
# for seconds, not hours
TRAIN = ("train.py", "--model_name_or_path", "{bert}", "--dataset", "text", "--data_files", "{corpus}",
         "--schedule", "mutual", "--num_steps", "16", "--eval_steps", "4", "--max_len", "32", "--batch_size", "4",
         "--max_steps", "1", "--eval_examples", "4", "--out_dir", "{out}/train", "--log_dir", "{out}/logs")
TRAIN_AR = ("train.py", "--process", "autoregressive", "--model_name_or_path", "{bert}", "--dataset", "text",
            "--data_files", "{corpus}", "--max_len", "32", "--batch_size", "4", "--max_steps", "1", "--eval_examples",
            "4", "--out_dir", "{out}/train", "--log_dir", "{out}/logs")
GAUSS = ("--process", "gaussian", "--schedule", "sqrt", "--emb_dim", "8", "--hidden_size", "16", "--num_layers",
         "1", "--num_heads", "2")
PREDICT = ("predict.py", "--checkpoint", "{ckpt}", "--num_samples", "2", "--out_dir", "{out}/gen")
ELBO = ("compute_elbo.py", "--checkpoint", "{ckpt}", "--num_examples", "4", "--out", "{out}/elbo.json")
DECODE = ("predict_downstream_condition.py", "--out_dir", "{out}/dec")
METRIC = ("compute_metric.py",)
BENCH = ("bench.py", "--quick")

# (row id, command line with {placeholders} of make_inputs, what the error line must contain)
ROWS = [
    # train.py: the inputs
    ("train-device-cuda", (*TRAIN, "--device", "cuda"), "--device cuda"),
    ("train-device-tpu9", (*TRAIN, "--device", "tpu9"), "--device tpu9"),
    ("train-lr-nan", (*TRAIN, "--lr", "nan"), "--lr"),
    ("train-lr-inf", (*TRAIN, "--lr", "inf"), "--lr"),
    ("train-out-dir-file", (*TRAIN, "--out_dir", "{file}"), "is a file"),
    # 8 bytes (logits and gradient, float32) x 32 x 100000 x 30522 (the MiniLM vocabulary) = 7.81e11 B = 728 GiB
    ("train-gauss-max-len", (*TRAIN, *GAUSS, "--task", "seq2seq", "--dataset", "folder", "--data_files", "{pairs}",
                             "--max_len", "100000", "--batch_size", "32"), "728 GiB"),
    # train.py: found by trying
    ("train-batch-0", (*TRAIN, "--batch_size", "0"), "--batch_size"),
    ("train-max-steps-neg", (*TRAIN, "--max_steps", "-3"), "--max_steps"),
    ("train-warmup-neg", (*TRAIN, "--warmup_steps", "-1"), "--warmup_steps"),
    ("train-weight-decay-neg", (*TRAIN, "--weight_decay", "-0.1"), "--weight_decay"),
    ("train-grad-clip-nan", (*TRAIN, "--grad_clip", "nan"), "--grad_clip"),
    ("train-dropout-1.5", (*TRAIN, "--dropout", "1.5"), "--dropout"),
    ("train-hybrid-nan", (*TRAIN, "--hybrid_lambda", "nan"), "--hybrid_lambda"),
    ("train-shape-pretrained", (*TRAIN, "--hidden_size", "64", "--num_layers", "1"), "--from_scratch"),
    ("train-emb-dim-absorbing", (*TRAIN, "--emb_dim", "16"), "--emb_dim"),
    ("train-scratch-heads", (*TRAIN, "--from_scratch", "--hidden_size", "30", "--num_heads", "4"), "--num_heads"),
    ("train-data-missing", (*TRAIN, "--data_files", "{missing}"), "does not exist"),
    # --objective mdlm (issue 22)
    ("train-mdlm-gaussian", (*TRAIN, *GAUSS, "--task", "seq2seq", "--dataset", "folder", "--data_files", "{pairs}",
                             "--objective", "mdlm"), "--process gaussian"),
    ("train-mdlm-spindle", (*TRAIN, "--objective", "mdlm", "--schedule", "spindle"), "token"),
    ("train-mdlm-released-weighting", (*TRAIN, "--objective", "mdlm", "--loss_weighting", "released"),
     "--loss_weighting"),
    ("train-mdlm-hybrid", (*TRAIN, "--objective", "mdlm", "--hybrid_lambda", "0.5"), "--hybrid_lambda"),
    ("train-resume-missing", (*TRAIN, "--resume", "{missing}"), "does not exist"),
    ("train-post-train-absorbing", (*TRAIN, "--post_train", "{ckpt}"), "--post_train"),
    ("train-eval-steps-above-T", (*TRAIN, "--eval_steps", "64"), "--eval_steps"),
    ("train-schedule-nonsense", (*TRAIN, "--schedule", "zigzag"), "--schedule"),
    ("train-sqrt-absorbing", (*TRAIN, "--schedule", "sqrt"), "--schedule sqrt"),
    ("train-workers-neg", (*TRAIN, "--num_workers", "-2"), "--num_workers"),
    # predict.py
    ("predict-device-cuda", (*PREDICT, "--device", "cuda"), "--device cuda"),
    ("predict-device-tpu9", (*PREDICT, "--device", "tpu9"), "--device tpu9"),
    ("predict-out-dir-file", (*PREDICT, "--out_dir", "{file}"), "is a file"),
    ("predict-checkpoint-missing", ("predict.py", "--checkpoint", "{missing}"), "does not exist"),
    ("predict-num-samples-0", (*PREDICT, "--num_samples", "0"), "--num_samples"),
    ("predict-batch-0", (*PREDICT, "--batch_size", "0"), "--batch_size"),
    ("predict-steps-0", (*PREDICT, "--steps", "0"), "--steps"),
    ("predict-steps-above-T", (*PREDICT, "--steps", "999"), "T=16"),
    ("predict-respacing-empty", (*PREDICT, "--decode_respacing", ""), "--decode_respacing"),
    ("predict-topk-neg", (*PREDICT, "--topk", "-1"), "--topk"),
    ("predict-temperature-0", (*PREDICT, "--temperature", "0"), "--temperature"),
    ("predict-top-p-nan", (*PREDICT, "--top_p", "nan"), "--top_p"),
    ("predict-length-word", (*PREDICT, "--length", "ten"), "--length"),
    ("predict-template-and-prompt", (*PREDICT, "--template", "a [MASK]", "--prompt", "a"), "--prompt"),
    ("predict-template-file-missing", (*PREDICT, "--template_file", "{missing}"), "--template_file"),
    ("predict-nan-weights", ("predict.py", "--checkpoint", "{nan}", "--out_dir", "{out}/gen"), NAN_TENSOR),
    ("predict-sampler-nonsense", (*PREDICT, "--sampler", "magic"), "--sampler"),
    # compute_elbo.py
    ("elbo-device-cuda", (*ELBO, "--device", "cuda"), "--device cuda"),
    ("elbo-device-tpu9", (*ELBO, "--device", "tpu9"), "--device tpu9"),
    ("elbo-num-examples-neg", (*ELBO, "--num_examples", "-1"), "--num_examples"),
    ("elbo-eval-steps-0", (*ELBO, "--eval_steps", "0"), "--eval_steps"),
    ("elbo-nan-weights", ("compute_elbo.py", "--checkpoint", "{nan}", "--out", "{out}/e.json"), NAN_TENSOR),
    ("elbo-eval-steps-above-T", (*ELBO, "--eval_steps", "64"), "T=16"),
    ("elbo-split-nonsense", (*ELBO, "--split", "dev"), "--split"),
    ("elbo-mdlm-monte-carlo", ("compute_elbo.py", "--checkpoint", "{ckpt_mdlm}", "--monte_carlo", "--out",
                               "{out}/m.json"), "--eval_steps"),
    ("elbo-num-examples-word", (*ELBO, "--num_examples", "x"), "--num_examples"),
    # predict_downstream_condition.py
    ("decode-device-cuda", (*DECODE, "--checkpoint", "{ckpt}", "--device", "cuda"), "--device cuda"),
    ("decode-device-tpu9", (*DECODE, "--checkpoint", "{ckpt}", "--device", "tpu9"), "--device tpu9"),
    ("decode-mbr-size-0", (*DECODE, "--checkpoint", "{ckpt}", "--mbr_size", "0"), "--mbr_size"),
    ("decode-no-checkpoint", DECODE, "--checkpoint"),
    ("decode-checkpoint-and-mbr-only", (*DECODE, "--checkpoint", "{ckpt}", "--mbr_only", "{good_jsonl}",
                                        "{good_jsonl}"), "--mbr_only"),
    ("decode-mbr-only-one-file", (*DECODE, "--mbr_only", "{good_jsonl}"), "--mbr_only"),
    ("decode-mbr-only-malformed", (*DECODE, "--mbr_only", "{good_jsonl}", "{bad_jsonl}"), "bad.jsonl:2"),
    ("decode-num-examples-neg", (*DECODE, "--checkpoint", "{ckpt}", "--num_examples", "-1"), "--num_examples"),
    ("decode-respacing-empty", (*DECODE, "--checkpoint", "{ckpt}", "--decode_respacing", ""), "--decode_respacing"),
    ("decode-out-dir-file", (*DECODE, "--checkpoint", "{ckpt}", "--out_dir", "{file}"), "is a file"),
    ("decode-lm-checkpoint", (*DECODE, "--checkpoint", "{ckpt}"), "predict.py"),
    # compute_metric.py
    ("metric-device-cuda", (*METRIC, "--mode", "seq2seq", "--samples", "{good_jsonl}", "--bertscore_model", "none",
                            "--out", "{root}/m1.json", "--device", "cuda"), "--device cuda"),
    ("metric-device-tpu9", (*METRIC, "--mode", "seq2seq", "--samples", "{good_jsonl}", "--bertscore_model", "none",
                            "--out", "{root}/m2.json", "--device", "tpu9"), "--device tpu9"),
    ("metric-compare-given-file", (*METRIC, "--mode", "compare", "--samples", "{good_jsonl}"), "not a folder"),
    ("metric-samples-missing", (*METRIC, "--samples", "{missing}", "--references", "{samples}",
                                "--out", "{root}/m3.json"), "does not exist"),
    ("metric-seq2seq-malformed", (*METRIC, "--mode", "seq2seq", "--samples", "{bad_jsonl}", "--bertscore_model",
                                  "none", "--out", "{root}/m4.json"), "bad.jsonl:2"),
    ("metric-tokenizer-missing", (*METRIC, "--samples", "{samples}", "--references", "{samples}", "--tokenizer",
                                  "{missing}", "--out", "{root}/m5.json"), "no_such_thing"),
    ("metric-max-samples-0", (*METRIC, "--samples", "{samples}", "--references", "{samples}", "--max_samples", "0"),
     "--max_samples"),
    ("metric-synthetic-no-language", (*METRIC, "--mode", "synthetic", "--samples", "{samples}",
                                      "--out", "{root}/m6.json"), "--language"),
    # the autoregressive baseline: the diffusion flags it has no use for
    ("train-ar-seq2seq", (*TRAIN_AR, "--task", "seq2seq"), "--task lm"),
    ("train-ar-num-steps", (*TRAIN_AR, "--num_steps", "16"), "--num_steps"),
    ("train-ar-schedule", (*TRAIN_AR, "--schedule", "mutual"), "--schedule"),
    ("train-ar-time-token", (*TRAIN_AR, "--time_conditioning", "token"),
     "--time_conditioning"),
    ("train-ar-mdlm", (*TRAIN_AR, "--objective", "mdlm"), "--objective mdlm"),
    ("predict-ar-steps", (*PREDICT, "--checkpoint", "{ckpt_ar}", "--steps", "8"), "--steps"),
    ("predict-ar-sampler", (*PREDICT, "--checkpoint", "{ckpt_ar}", "--sampler", "confidence"), "--sampler"),
    ("predict-ar-template", (*PREDICT, "--checkpoint", "{ckpt_ar}", "--template", "the [MASK] of god"), "--prompt"),
    ("predict-ar-length", (*PREDICT, "--checkpoint", "{ckpt_ar}", "--length", "5"), "--length"),
    ("predict-ar-top-p-0", (*PREDICT, "--checkpoint", "{ckpt_ar}", "--top_p", "0"), "--top_p"),
    ("predict-ar-temperature-0", (*PREDICT, "--checkpoint", "{ckpt_ar}", "--temperature", "0"), "--temperature"),
    ("elbo-ar-monte-carlo", (*ELBO, "--checkpoint", "{ckpt_ar}", "--monte_carlo"), "exact"),
    # bench.py
    ("bench-device-cuda", (*BENCH, "--device", "cuda"), "--device cuda"),
    ("bench-device-tpu9", (*BENCH, "--device", "tpu9"), "--device tpu9"),
    ("bench-batch-0", (*BENCH, "--batch_size", "0"), "--batch_size"),
]
ROWS = [(rid, args[0], args[1:], needle) for rid, args, needle in ROWS]
SUBPROCESS_ROWS = ("train-device-cuda", "predict-device-tpu9", "elbo-device-cuda", "decode-device-tpu9",
                   "metric-compare-given-file", "bench-device-tpu9")  # one per script, through a real interpreter


def expand(args, paths: dict, rid: str) -> list[str]:
    """The command line of row ``rid``; its outputs go to a folder of its own."""
    paths = dict(paths, out=os.path.join(paths["out"], rid))
    return [a.format(**paths) for a in args]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_bert, tiny_corpus, tiny_pairs) -> dict:
    return make_inputs(str(tmp_path_factory.mktemp("bad_flags")), tiny_bert, tiny_corpus, tiny_pairs)


def _skip_cuda(rid: str) -> None:
    if CUDA and "device-cuda" in rid:
        pytest.skip("this machine has CUDA: --device cuda is valid here")


def test_the_table_is_large_and_covers_every_script():
    assert len(ROWS) >= 30 and len({r[0] for r in ROWS}) == len(ROWS)
    for script in ("train.py", "predict.py", "compute_elbo.py", "predict_downstream_condition.py",
                   "compute_metric.py", "bench.py"):
        ids = {rid for rid, s, _, _ in ROWS if s == script}
        assert any("device-cuda" in i for i in ids) and any("device-tpu9" in i for i in ids), script


@pytest.mark.parametrize("rid,script,args,needle", ROWS, ids=[r[0] for r in ROWS])
def test_bad_flag_is_one_error_line(inputs, rid, script, args, needle):
    _skip_cuda(rid)
    before = sorted(n for n in os.listdir(inputs["root"]) if n != ".hf_cache")
    proc = run_here(script, *expand(args, inputs, rid), cwd=inputs["root"])
    one_error_line(proc, needle.format(**inputs))
    assert sum("error:" in line for line in proc.stderr.splitlines()) == 1, proc.stderr
    assert sorted(n for n in os.listdir(inputs["root"]) if n != ".hf_cache") == before  # nothing was written (no out/ folder either)


def test_bad_flags_through_a_real_interpreter(inputs):
    """One row per script as a subprocess: the exit status and the stderr a user sees."""
    rows = [r for r in ROWS if r[0] in SUBPROCESS_ROWS and not (CUDA and "device-cuda" in r[0])]
    procs = run_together(*(lambda r=r: run_cli(r[1], *expand(r[2], inputs, r[0]), cwd=inputs["root"], check=False)
                           for r in rows))
    for (rid, _, _, needle), proc in zip(rows, procs):
        one_error_line(proc, needle.format(**inputs))


def _fixtures_for_tool(root: str) -> dict:  # pragma: no cover - for tests/bad_flag_inputs.py run as a script
    """make_inputs with conftest's tiny BERT, corpus and pairs rebuilt outside pytest."""
    import json

    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from common.loading import resolve_model_path
    from textdata.bible import load_verse_pairs
    os.makedirs(root, exist_ok=True)
    bert, corpus, pairs_dir = (os.path.join(root, n) for n in ("tiny_bert", "tiny_corpus", "tiny_pairs"))
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=128)).save_pretrained(bert)
    tok.save_pretrained(bert)
    pairs, _ = load_verse_pairs()
    os.makedirs(corpus), os.makedirs(pairs_dir)
    for split, ps in {"train": pairs[:240], "valid": pairs[300:340], "test": pairs[400:440]}.items():
        with open(os.path.join(corpus, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{p.web}\n" for p in ps))
        with open(os.path.join(pairs_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.write("".join(json.dumps({"src": p.kjv, "trg": p.web}) + "\n" for p in ps))
    return make_inputs(os.path.join(root, "in"), bert, corpus, pairs_dir)


def test_compute_metric_takes_a_run_directory_as_tokenizer(inputs, tmp_path):
    """As every other script: a run directory means its best checkpoint's tokenizer (here the MiniLM one, so
    the metrics equal those with --tokenizer minilm)."""
    metrics = {}
    for name, tok in (("run", inputs["run"]), ("minilm", "minilm")):
        out = tmp_path / f"{name}.json"
        refs = tmp_path / "refs.txt"
        refs.write_text("In the Beginning, God created\nthe Heaven and the Earth.\n")
        proc = run_here("compute_metric.py", "--samples", inputs["samples"], "--references", str(refs),
                        "--tokenizer", tok, "--out", str(out), cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        metrics[name] = json.loads(out.read_text())
    assert metrics["run"]["metrics"] == metrics["minilm"]["metrics"]
    assert metrics["run"]["inputs"]["references_normalised_with"] == inputs["run"]
