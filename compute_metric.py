"""Compute text-generation metrics for generated samples.

Usage::

    # unconditional generation: one sample per line, BLEU against a reference set
    python compute_metric.py --samples generation_results/x.txt --references data/bible/test.txt \
        [--max_references N] [--max_samples N] [--seed S] [--out FILE.json] [--overwrite]

    # seq2seq (DiffuSeq-format JSON lines with recover/reference/source): one file, several
    # per-seed files, or a folder of them (every *json file in it, sorted by name)
    python compute_metric.py --mode seq2seq --samples FILE_OR_FOLDER [FILE ...] \
        [--bertscore_model minilm|PATH|HUB_NAME|none] [--bertscore_layer K] [--mbr [--mbr_order reversed]] \
        [--out FILE.json] [--overwrite]

    # samples of a synthetic language (textdata/synthetic.py): exact NLL per token under the true
    # language, the fraction with a forbidden transition, beside the true entropy and held-out text
    python compute_metric.py --mode synthetic --samples generation_results/x.txt --language data/synth/language.json \
        [--references data/synth/test.txt] [--joins generation_results/x.json|none]

    # filled templates (predict.py --template_file): given words kept, exact-word accuracy of the slots
    # against the sentences the templates were made from, and with --language their exact NLL
    python compute_metric.py --mode infill --samples filled.txt --templates templates.txt --references originals.txt \
        [--language data/synth/language.json]

    # compare decoding settings: one generation folder each (seed*.jsonl + decode.json, as written by
    # predict_downstream_condition.py); MBR metrics, diversity across the seeds, wall time, network calls;
    # --plot: a PNG of the --plot_metrics against network calls per sequence, a line per checkpoint
    python compute_metric.py --mode compare --samples generation_results/a generation_results/b ... --out cmp.json \
        [--plot cmp.png [--plot_metrics bleu exact_match]]

Prints a table and writes JSON (default ``<samples>.metrics.json`` in unconditional mode;
in seq2seq mode ``FOLDER/seq2seq_metrics.json`` for a folder and ``<first file>.seq2seq_metrics.json``
for files). Outputs are never overwritten without ``--overwrite``. Bad input gives one
``error: ...`` line on stderr and exit code 2.

Input conventions: samples are read line by line (UTF-8) and *every* line is a sample, so an
empty line is an empty sample (counted and warned about, never dropped). Empty lines in the
references file are not references and are dropped (also warned about). The metric
conventions are in :mod:`evaluation.text_metrics` (unconditional) and :mod:`evaluation.seq2seq`.

Modes plug in through :data:`MODES`: a function taking the parsed
arguments and returning ``(metrics, inputs)`` dicts.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import time
from typing import Callable

from evaluation import plots, seq2seq
from evaluation.text_metrics import CONVENTIONS, summarise_unconditional
from common.cli import make_parser
from common.errors import UserError as InputError, cli_main, refuse_overwrite
from common.io import write_json_atomic

def normalise_like_samples(lines: list[str], tokenizer_path: str) -> list[str]:
    """Round-trip references through the tokenizer that produced the samples (lower case,
    wordpiece spacing of punctuation), so that BLEU compares like with like."""
    from common.loading import load_tokenizer
    if os.path.isdir(os.path.join(tokenizer_path, "checkpoints")):  # a run directory, as the other scripts take
        from runtime.checkpoint import resolve
        tokenizer_path = resolve(tokenizer_path)
    tok, _ = load_tokenizer(tokenizer_path)
    ids = tok(lines, add_special_tokens=False)["input_ids"]
    return [" ".join(tok.decode(x, skip_special_tokens=True).split()) for x in ids]


# --------------------------------------------------------------------------- input


def read_lines(path: str, what: str) -> list[str]:
    """Lines of a UTF-8 text file without their line endings; raises InputError if unusable."""
    if not os.path.exists(path):
        raise InputError(f"{what} file {path} does not exist")
    if not os.path.isfile(path):
        raise InputError(f"{what} file {path} is not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            # readlines() splits like the original script (on newlines only, not on the
            # other separators str.splitlines() knows).
            lines = [line.rstrip("\n") for line in f.readlines()]
    except UnicodeDecodeError as e:
        # e.start is relative to the decoder's chunk, not the file, so it is not reported.
        raise InputError(f"{what} file {path} is not valid UTF-8 ({e.reason})")
    except OSError as e:
        raise InputError(f"cannot read {what} file {path}: {e.strerror or e}")
    if not any(line.strip() for line in lines):
        raise InputError(f"{what} file {path} has no non-empty lines")
    return lines


def seeded_subset(items: list[str], k: int | None, seed: int, stream: str) -> list[str]:
    """``k`` items drawn without replacement (file order kept), or all if ``k`` is None/too big.

    ``stream`` names an independent RNG stream so that subsetting samples does not change
    which references are drawn (string seeds are deterministic across runs).
    """
    if k is None or k >= len(items):
        return list(items)
    rng = random.Random(f"{seed}:{stream}")
    return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


# --------------------------------------------------------------------------- modes


def run_unconditional(args: argparse.Namespace) -> tuple[dict, dict]:
    """BLEU vs a reference set, self-BLEU, distinct-n and length for unconditional samples."""
    if args.references is None:
        raise InputError("--references is required in unconditional mode")
    if len(args.samples) != 1:
        raise InputError(f"unconditional mode takes one --samples file, got {len(args.samples)}")
    samples_path = args.samples[0]
    sample_lines = read_lines(samples_path, "samples")
    reference_lines = read_lines(args.references, "references")

    empty_in_file = sum(1 for line in sample_lines if not line.strip())
    if empty_in_file:
        print(f"warning: {empty_in_file} of {len(sample_lines)} sample lines are empty; "
              "they are kept as empty samples", file=sys.stderr)
    references = [line for line in reference_lines if line.strip()]
    dropped_refs = len(reference_lines) - len(references)
    if dropped_refs:
        print(f"warning: dropped {dropped_refs} empty lines from the references file",
              file=sys.stderr)

    samples = seeded_subset(sample_lines, args.max_samples, args.seed, "samples")
    references = seeded_subset(references, args.max_references, args.seed, "references")
    if args.tokenizer:
        references = normalise_like_samples(references, args.tokenizer)
    if len(samples) < 2:
        raise InputError(f"need at least 2 samples for self-BLEU, got {len(samples)}")

    metrics = summarise_unconditional(samples, references)
    inputs = {
        "samples": samples_path,
        "references": args.references,
        "sample_lines_in_file": len(sample_lines),
        "empty_sample_lines_in_file": empty_in_file,
        "empty_samples_evaluated": sum(1 for s in samples if not s.strip()),
        "reference_lines_in_file": len(reference_lines),
        "empty_reference_lines_dropped": dropped_refs,
        "references_normalised_with": args.tokenizer,
        "max_samples": args.max_samples,
        "max_references": args.max_references,
        "seed": args.seed,
    }
    return metrics, inputs


SEQ2SEQ_OUT_NAME = "seq2seq_metrics.json"


def seq2seq_files(paths: list[str], out_path: str | None) -> list[str]:
    """The per-seed output files: the given files in order, or a folder's ``*json`` files sorted by
    name (DiffuSeq's ``sorted(glob(folder/*json))``) minus metric files written by this script.
    A folder written by predict_downstream_condition.py (it has a ``decode.json``) gives its
    ``seed*.jsonl`` files, sorted by name."""
    if len(paths) == 1 and os.path.isdir(paths[0]):
        ours = sorted(glob.glob(os.path.join(glob.escape(paths[0]), "seed*.jsonl")))
        if ours and os.path.isfile(os.path.join(paths[0], "decode.json")):
            return ours
        out = os.path.abspath(out_path) if out_path else None
        files = [f for f in sorted(glob.glob(os.path.join(glob.escape(paths[0]), "*json")))
                 if os.path.isfile(f) and not f.endswith("metrics.json") and os.path.abspath(f) != out]
        if not files:
            raise InputError(f"folder {paths[0]} holds no *json output files")
        return files
    for p in paths:
        if os.path.isdir(p):
            raise InputError(f"{p} is a folder; give either one folder or one or more files")
    return list(paths)


def run_seq2seq(args: argparse.Namespace) -> tuple[dict, dict]:
    """BLEU, ROUGE-L, BERTScore, dist-1, length; self-BLEU and div-4 across several seed files."""
    for flag in ("references", "tokenizer", "max_samples", "max_references", "language"):
        if getattr(args, flag) is not None:
            raise InputError(f"--{flag} is not used in seq2seq mode (references come from the files)")
    files = seq2seq_files(args.samples, args.out)
    if args.mbr and len(files) < 2:
        raise InputError("--mbr needs at least 2 output files (one per seed)")
    if args.mbr_order != "diffuseq" and not args.mbr:
        raise InputError("--mbr_order only changes the --mbr choice; give --mbr too")
    rows_per_seed = [seq2seq.read_outputs(f) for f in files]
    bert = None if args.bertscore_model.lower() == "none" else args.bertscore_model
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    metrics = seq2seq.evaluate_outputs(rows_per_seed, bertscore_model=bert, mbr=args.mbr, names=files,
                                       bertscore_layer=args.bertscore_layer, device=device,
                                       batch_size=args.bertscore_batch_size, mbr_order=args.mbr_order)
    inputs = {
        "samples": args.samples,
        "files": files,
        "rows_per_file": len(rows_per_seed[0]),
        "references_from": files[0],
        "mbr": args.mbr,
        "mbr_order": args.mbr_order,
        "bertscore_model": args.bertscore_model,
        "bertscore_layer": args.bertscore_layer,
        "device": device,
    }
    return metrics, inputs


def run_synthetic(args: argparse.Namespace) -> tuple[dict, dict]:
    """Exact NLL per token of the samples (and of held-out references) under the synthetic language."""
    from textdata.synthetic import SyntheticLanguage, bigram_tv, distinct_fraction, score
    if args.language is None:
        raise InputError("--language (a language.json written with the synthetic data) is required in synthetic mode")
    if len(args.samples) != 1:
        raise InputError(f"synthetic mode takes one --samples file, got {len(args.samples)}")
    if not os.path.isfile(args.language):
        raise InputError(f"language file {args.language} does not exist")
    try:
        language = SyntheticLanguage.load(args.language)
    except (ValueError, KeyError) as e:
        raise InputError(f"cannot read the synthetic language {args.language}: {e}")
    samples = seeded_subset(read_lines(args.samples[0], "samples"), args.max_samples, args.seed, "samples")
    entropy = language.entropy()
    metrics = {"true_entropy_per_token": entropy["per_token"], "true_entropy_per_sequence": entropy["per_sequence"],
               **{f"sample_{k}": v for k, v in score(language, samples).items()},
               "sample_bigram_tv": bigram_tv(language, samples), "sample_distinct_fraction": distinct_fraction(samples)}
    if args.joins:
        from textdata.synthetic import score_chain
        joins = read_joins(args.joins)
        metrics.update({f"sample_chain_{k}": v for k, v in
                        score_chain(language, samples, [joins.get(len(x.split()), []) for x in samples]).items()})
    if args.references:
        refs = [r for r in read_lines(args.references, "references") if r.strip()]
        refs = seeded_subset(refs, args.max_references, args.seed, "references")
        metrics.update({f"reference_{k}": v for k, v in score(language, refs).items()})
        # the TV of finite samples is not 0: the language's own lines, as many as the samples, set the floor
        metrics.update({"reference_bigram_tv": bigram_tv(language, refs[:len(samples)]),
                        "reference_bigram_tv_lines": min(len(refs), len(samples)),
                        "reference_distinct_fraction": distinct_fraction(refs)})
        if "sample_nll_per_token" in metrics:
            metrics["nll_ratio_samples_to_references"] = metrics["sample_nll_per_token"] / metrics["reference_nll_per_token"]
    return metrics, {"samples": args.samples[0], "language": args.language, "references": args.references,
                     "max_samples": args.max_samples, "seed": args.seed, "joins": args.joins}


def read_joins(path: str) -> dict[int, list[int]]:
    """``--joins``: {length: the positions that begin a block after the first} from predict.py's json of a
    semi-autoregressive run (its ``semi_ar.joins``); {} for ``none`` (one-canvas samples, scored alike)."""
    if path == "none":
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        return {int(n): list(at) for n, at in record["semi_ar"]["joins"].items()}
    except (OSError, ValueError) as e:
        raise InputError(f"--joins {path}: {e}")
    except (KeyError, TypeError, AttributeError):
        raise InputError(f"--joins {path} is not predict.py's json of a semi-autoregressive run (no semi_ar.joins); "
                         "give 'none' for samples of one canvas")


def run_infill(args: argparse.Namespace) -> tuple[dict, dict]:
    """Filled templates against their templates and the references they were cut from
    (:func:`evaluation.infill.score_fills`); with ``--language``, the exact NLL of the fills and of the
    references under the synthetic language."""
    from evaluation.infill import score_fills
    if len(args.samples) != 1 or not args.templates or not args.references:
        raise InputError("infill mode takes one --samples file, --templates and --references (aligned line by line)")
    fills, templates = read_lines(args.samples[0], "samples"), read_lines(args.templates, "templates")
    refs = read_lines(args.references, "references")
    try:
        metrics = score_fills(templates, fills, refs)
    except ValueError as e:
        raise InputError(f"infill mode: {e}")
    if args.language:
        from textdata.synthetic import SyntheticLanguage, score
        language = SyntheticLanguage.load(args.language)
        metrics |= {f"fill_{k}": v for k, v in score(language, fills).items()}
        metrics |= {f"reference_{k}": v for k, v in score(language, refs).items()}
    return metrics, {"samples": args.samples[0], "templates": args.templates, "references": args.references,
                     "language": args.language}


def decode_cost(folder: str) -> dict:
    """Wall time and network calls of a decoding run, and what it decoded (checkpoint, process and respacing,
    for the plot's lines), from its ``decode.json``."""
    path = os.path.join(folder, "decode.json")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        timings, n = info["timings"], info["num_sources"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot read the timings in {path}: {e}")
    return {"wall_seconds": sum(t["wall_seconds"] for t in timings),
            "network_calls": sum(t["network_calls"] for t in timings),
            "calls_per_sequence": sum(t["row_evaluations"] for t in timings) / max(1, n * len(timings)),
            "device": info.get("device"), "checkpoint": info.get("checkpoint"), "process": info.get("process"),
            "decode_respacing": info.get("decode_respacing")}


def run_compare(args: argparse.Namespace) -> tuple[dict, dict]:
    """One row per generation folder: metrics of the MBR choice over its ``seed*.jsonl`` files,
    self-BLEU/div-4 across them, and the decoding cost from ``decode.json``; with ``--plot``, a PNG of the
    ``--plot_metrics`` against network calls per sequence."""
    if args.plot:
        refuse_overwrite(args.plot, args.overwrite)  # before the metrics, which may take long
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
            raise InputError(f"--plot: directory {os.path.dirname(os.path.abspath(args.plot))} does not exist")
    rows = []
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    bert = None if args.bertscore_model.lower() == "none" else args.bertscore_model
    for folder in args.samples:
        files = sorted(glob.glob(os.path.join(glob.escape(folder), "seed*.jsonl")))
        if not os.path.isdir(folder) or not files:
            raise InputError(f"{folder} is not a generation folder with seed*.jsonl files")
        m = seq2seq.evaluate_outputs([seq2seq.read_outputs(f) for f in files], bertscore_model=bert,
                                     mbr=len(files) > 1, names=files, bertscore_layer=args.bertscore_layer,
                                     device=device, batch_size=args.bertscore_batch_size)
        m.pop("per_file", None)
        rows.append({"setting": os.path.basename(os.path.normpath(folder)), **m, **decode_cost(folder)})
    n = {r["num_sources"] for r in rows}
    if len(n) > 1:
        raise InputError(f"the folders decode different numbers of sources ({sorted(n)}); compare like with like")
    if args.plot:
        missing = [m for m in args.plot_metrics if not all(isinstance(r.get(m), (int, float)) for r in rows)]
        if missing:
            have = sorted(k for k in rows[0] if isinstance(rows[0][k], float))
            raise InputError(f"--plot_metrics: {', '.join(missing)} not in every compared row "
                             f"(numbers: {', '.join(have)})")
    return {"rows": rows}, {"samples": args.samples, "bertscore_model": args.bertscore_model, "device": device,
                            "plot": args.plot}


def format_compare(rows: list[dict]) -> str:
    """A markdown table of the compared settings."""
    cols = [("setting", "{}"), ("exact_match", "{:.3f}"), ("bleu", "{:.4f}"), ("rouge_l", "{:.4f}"), ("bertscore_f1", "{:.4f}"),
            ("dist_1", "{:.4f}"), ("avg_len", "{:.1f}"), ("self_bleu", "{:.4f}"), ("calls_per_sequence", "{:.0f}"),
            ("wall_seconds", "{:.1f}")]
    cols = [(c, f) for c, f in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[c]) if r.get(c) is not None else "-" for c, f in cols) + " |")
    return "\n".join(lines)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


# Mode name -> function(args) -> (metrics, inputs).
MODES: dict[str, Callable[[argparse.Namespace], tuple[dict, dict]]] = {
    "unconditional": run_unconditional,
    "seq2seq": run_seq2seq,
    "compare": run_compare,
    "synthetic": run_synthetic,
    "infill": run_infill,
}
SYNTHETIC_CONVENTIONS = ("each line is one sequence of whitespace-separated words; nll_per_token = -sum log p(line) / "
                         "sum words over the lines with a finite likelihood (log p includes the length term); "
                         "forbidden_fraction = lines with a transition the language never makes or an unknown word; "
                         "invalid_fraction = lines with zero probability (also an impossible length); nats; "
                         "bigram_tv = 0.5 sum |f - F| over transitions (start -> first word, adjacent pairs, last "
                         "word -> end: n + 1 per line), f pooled over the lines, F the language's expected "
                         "frequencies (E[count] / (E[n] + 1)), unknown words one symbol; reference_bigram_tv: the "
                         "first min(references, samples) references, the floor of finite samples; "
                         "distinct_fraction = distinct lines / lines; "
                         "with --joins, sample_chain_*: each line one run of the chain (log pi(w_1) + sum log "
                         "P(w_i | w_(i-1)), no length term), forbidden rates per transition at the block joins and "
                         "inside the blocks (textdata.synthetic.score_chain)")
INFILL_CONVENTIONS = ("words are whitespace-separated and a template's [MASK] is one word; given_kept: the "
                      "template's words in place and its length; slot_accuracy: slots holding the reference's "
                      "word, over all slots; fill_nll_per_token: as synthetic mode, over the fills")
MODE_CONVENTIONS = {"infill": INFILL_CONVENTIONS, "unconditional": CONVENTIONS, "seq2seq": seq2seq.CONVENTIONS,
                    "compare": seq2seq.CONVENTIONS,
                    "synthetic": SYNTHETIC_CONVENTIONS}


def default_out_path(args: argparse.Namespace) -> str:
    first = args.samples[0]
    if args.mode == "compare":
        return os.path.join(args.samples[0], "compare_metrics.json")
    if args.mode == "seq2seq":
        if len(args.samples) == 1 and os.path.isdir(first):
            return os.path.join(first, SEQ2SEQ_OUT_NAME)
        return f"{first}.{SEQ2SEQ_OUT_NAME}"
    return f"{first}.metrics.json"


# --------------------------------------------------------------------------- output


def _shown(value) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def format_table(metrics: dict) -> str:
    """Two-column text table of the scalar entries; floats with 6 decimals."""
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    width = max(len(name) for name in scalars)
    rows = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  {'-' * 10}"]
    for name, value in scalars.items():
        rows.append(f"{name.ljust(width)}  {_shown(value)}")
    return "\n".join(rows)


def format_per_file(per_file: list[dict], files: list[str]) -> str:
    """One row per file, one column per numeric metric."""
    cols = [k for k, v in per_file[0].items() if isinstance(v, float)]
    names = [os.path.basename(f) for f in files]
    width = max(len("file"), *(len(n) for n in names))
    rows = ["  ".join(["file".ljust(width)] + [c.rjust(max(len(c), 8)) for c in cols])]
    for name, m in zip(names, per_file):
        rows.append("  ".join([name.ljust(width)] + [f"{m[c]:.4f}".rjust(max(len(c), 8)) for c in cols]))
    return "\n".join(rows)


def write_output(path: str, payload: dict, overwrite: bool) -> None:
    """Write JSON via a temp file in the same directory and ``os.replace``.

    Readers never see a half-written file, and an interrupted run leaves the old file intact.
    """
    refuse_overwrite(path, overwrite)  # again: another process may have written it meanwhile
    try:
        write_json_atomic(path, payload)
    except OSError as e:
        raise InputError(f"cannot write output file {path}: {e.strerror or e}")


# --------------------------------------------------------------------------- CLI


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--mode", choices=sorted(MODES), default="unconditional",
                        help="which metric set to compute (default: unconditional)")
    parser.add_argument("--samples", required=True, nargs="+",
                        help="unconditional: one file, one sample per line; seq2seq: one DiffuSeq-format "
                             "JSON-lines file, several per-seed files, or a folder of them")
    parser.add_argument("--references", help="reference text, one sentence per line")
    parser.add_argument("--max_samples", type=positive_int, default=None,
                        help="evaluate a seeded random subset of this many samples (default: all)")
    parser.add_argument("--max_references", type=positive_int, default=None,
                        help="use a seeded random subset of this many references (default: all)")
    parser.add_argument("--tokenizer", default=None,
                        help="round-trip the references through this tokenizer (a run directory: its best "
                             "checkpoint's; a checkpoint directory, a model directory or 'minilm') so they are "
                             "formatted like decoded samples")
    parser.add_argument("--seed", type=int, default=0, help="seed for the subsets (default: 0)")
    parser.add_argument("--language", default=None,
                        help="synthetic mode: the language.json written with the synthetic data")
    parser.add_argument("--joins", default=None, metavar="RECORD|none",
                        help="synthetic mode: also score each line as one run of the chain, no length term "
                             "(sample_chain_*), its transitions split at the block joins listed in RECORD, "
                             "predict.py's json of a --length past --max_len (semi-autoregressive); none: "
                             "samples of one canvas, scored alike")
    parser.add_argument("--templates", default=None,
                        help="infill mode: the templates the samples fill, one per line ([MASK] marks a slot)")
    seq = parser.add_argument_group("seq2seq mode")
    seq.add_argument("--bertscore_model", default="minilm",
                     help="encoder for BERTScore (computed by the bert-score package): 'minilm', a model "
                          "directory, a cached hub name such as microsoft/deberta-xlarge-mnli (DiffuSeq's), "
                          "or 'none' to skip (default: minilm)")
    seq.add_argument("--bertscore_layer", type=int, default=None,
                     help="hidden layer for BERTScore embeddings, 0 = input embeddings (default: bert-score's "
                          "layer for the model, 40 for deberta-xlarge-mnli, else the last)")
    seq.add_argument("--bertscore_batch_size", type=positive_int, default=64,
                     help="sentence pairs per BERTScore batch (default: 64)")
    seq.add_argument("--mbr", action="store_true",
                     help="with several seed files: headline metrics on the MBR choice per source "
                          "(default: on the first file)")
    seq.add_argument("--mbr_order", choices=seq2seq.ORDERS, default="diffuseq",
                     help="BLEU argument order of the --mbr choice: diffuseq = DiffuSeq's current "
                          "get_bleu, sentence_bleu([c_j], c_i) (default); reversed = its first release and "
                          "DiffusionBERT, sentence_bleu([c_i], c_j). BLEU and self-BLEU are reported in both "
                          "orders (bleu, bleu_reversed, self_bleu, self_bleu_reversed)")
    seq.add_argument("--device", default=None,
                     help="device for BERTScore (default: cuda if available, else cpu)")
    cmp = parser.add_argument_group("compare mode")
    cmp.add_argument("--plot", default=None, metavar="PATH.png",
                     help="also write a PNG of --plot_metrics against network calls per sequence, a line per "
                          "checkpoint (and, for DiffuSeq, per uniform/adp step grid)")
    cmp.add_argument("--plot_metrics", nargs="+", default=["bleu", "exact_match"], metavar="METRIC",
                     help="the rows' metrics to plot, one panel each (default: bleu exact_match)")
    parser.add_argument("--out", default=None,
                        help="JSON output path (default: <samples>.metrics.json; seq2seq: "
                             "FOLDER/seq2seq_metrics.json or <first file>.seq2seq_metrics.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing JSON output")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> None:
    """Run the CLI: bad input is one ``error:`` line and exit code 2."""
    args = build_parser().parse_args(argv)
    if args.plot and args.mode != "compare":
        raise InputError("--plot is for --mode compare")
    if args.mode == "compare":  # before the default output path, which lies inside the first folder
        for p in args.samples:
            if not os.path.isdir(p):
                raise InputError(f"--mode compare takes generation folders (seed*.jsonl + decode.json, written by "
                                 f"predict_downstream_condition.py); {p} is "
                                 f"{'a file, not a folder' if os.path.exists(p) else 'not a folder: it does not exist'}")
    if args.device is not None:
        from runtime.dist import pick_device
        pick_device(args.device)
    out_path = args.out = args.out or default_out_path(args)
    start = time.perf_counter()
    refuse_overwrite(out_path, args.overwrite)  # early, so that a long computation is not thrown away
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise InputError(f"output directory {out_dir} does not exist")
    metrics, inputs = MODES[args.mode](args)
    seconds = time.perf_counter() - start
    payload = {
        "mode": args.mode,
        "metrics": metrics,
        "inputs": inputs,
        "conventions": MODE_CONVENTIONS[args.mode],
        "seconds": round(seconds, 3),
    }
    write_output(out_path, payload, args.overwrite)
    if args.mode == "compare" and args.plot:  # after the JSON: the metrics are kept if drawing fails
        plots.compare_plot(args.plot, metrics["rows"], args.plot_metrics)
    print(format_compare(metrics["rows"]) if args.mode == "compare" else format_table(metrics))
    if "per_file" in metrics:
        print("\nper file:")
        print(format_per_file(metrics["per_file"], inputs["files"]))
    print(f"wrote {out_path}")
    if args.mode == "compare" and args.plot:
        print(f"wrote {args.plot}")
    print(f"took {seconds:.2f} s")


if __name__ == "__main__":
    main()
