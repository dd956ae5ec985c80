"""Conditional (seq2seq) sampling from a DiffusionBERT or DiffuSeq checkpoint, with MBR decoding.

    python predict_downstream_condition.py --checkpoint outputs/cond --split test --mbr_size 10 --steps 200
    python predict_downstream_condition.py --checkpoint outputs/diffuseq --decode_respacing adp_20 --mbr_size 10
    python predict_downstream_condition.py --mbr_only generation_results/x/seed*.jsonl --out_dir generation_results/x-mbr

The process and the canvas come from the checkpoint. The source ``[CLS] src [SEP]`` (a run trained with
``--canvas released``: DiffusionBERT's ``[CLS] prompt(src)``) is never noised and stays fixed;
the target region is denoised (absorbing: from all-[MASK] over ``--steps`` iterations; gaussian: from
N(0, I) over the steps chosen by ``--decode_respacing``, with clamping) and its length is decided by
the generated padding (DiffuSeq style). Each of the S candidates uses seed ``--seed + k``. Writes
DiffuSeq's output format (one JSON object per line: ``recover``, ``reference``, ``source``) to
``generation_results/<name>/seed<k>.jsonl``, the MBR selection to ``mbr.jsonl`` and the copy
baseline (the source itself as the output) to ``copy_source.jsonl``.

The strings are DiffuSeq's (``evaluation.seq2seq.decode_like_diffuseq``): each region of the canvas
(source ``[CLS] src [SEP]``, reference ``trg [SEP]``, recover = the generated target region)
without its trailing [PAD]s, decoded with the special tokens kept and BERT's clean-up of
tokenization spaces. The metrics strip [CLS]/[SEP]/[PAD] as DiffuSeq's eval script does. For the
Gaussian process recover is the whole region, so words generated after a [SEP] count, as in DiffuSeq;
for the absorbing process it ends at the first [SEP], as DiffusionBERT's decoder cuts at its end token.

Under ``torchrun --nproc_per_node N`` the batches are shared out among the ranks; every batch has its
own seed (from the candidate's seed and the batch index) and rank 0 writes the files in input order,
so they are the same for any number of ranks.

While it runs, each finished batch is kept in ``<name>/partial/seed<k>/`` and each finished candidate is
written as it completes: after Ctrl-C (exit 130), SIGTERM (143) or a crash, the same command (or
``--resume``) continues and writes the same files as an uninterrupted run; ``--overwrite`` removes the
folder's earlier results and starts again. A second decoder on the same folder is refused while one runs
(``runtime.outputs``).

The decoding is ``runtime.api``'s: in Python, ``load(checkpoint).decode(sources, ..., seed=k)`` returns the
``recover`` strings of ``seed<k>.jsonl`` for those sources (where the pair data did not cut them).
"""
from __future__ import annotations

import json
import os
import time

if __name__ == "__main__":  # before torch loads: start again on jemalloc where it is installed (common/heap.py)
    from common.heap import prefer_jemalloc
    prefer_jemalloc()

from runtime import api, dist, outputs
from runtime.assemble import WEIGHTS, load_task_data
from common import heap
from common.cli import add_rule_options, make_parser, other_steps
from common.errors import UserError, check_decoding_flags, cli_main, require_at_least_one
from common.io import write_text_atomic


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--checkpoint", help="checkpoint directory, or a run directory (uses its best)")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--num_examples", type=int, default=0, help="decode the first N examples of the split (0: all)")
    p.add_argument("--steps", type=int, default=None, help="absorbing: sampling iterations (grid over 0..T; default 200); "
                        f"{other_steps('steps')}")
    p.add_argument("--decode_respacing", default=None,
                   help="gaussian: the sampling steps, a subset of 1..T (train.py's --num_steps): full (all T, the "
                        "default), uniform_N, adp_N (Tang et al.'s adaptive decay) or a comma-separated list; the "
                        "gaussian counterpart of --steps")
    p.add_argument("--weights", default="ema", choices=WEIGHTS,
                   help="gaussian: decode with the EMA of the weights (default, as DiffuSeq) or the raw weights")
    p.add_argument("--sampler", default="ours", metavar="NAME",
                   help="absorbing: ours (default: top-k/top-p/temperature filter p_hat, then the exact reverse step); "
                        "released (DiffusionBERT's sampler: they filter the posterior logits with [MASK] a candidate, and redraw every target position from p_hat at the last step; its settings: --topk 15 --temperature 1 --steps 200); "
                        "confidence (unmask the most confident positions, --order); parallel (Fast-dLLM: every "
                        "position above --threshold); remask (ReMDM, --remask, --eta); first_hitting (exact, the "
                        "network only for rows that change). docs/algorithms.md section 4")
    add_rule_options(p)
    p.add_argument("--start_id", type=int, default=None,
                   help="absorbing, --sampler released: the token the target starts from instead of [MASK]; 103 is "
                        "the released decoder's (mask_token_id=103, BERT's [MASK], even with roberta-base, where the "
                        "chain then stays put until the last step's redraw)")
    p.add_argument("--topk", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--mbr_size", type=int, default=1, help="S candidates per source (seeds --seed .. --seed+S-1)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no_cache", action="store_true", help="call the network at every step")
    p.add_argument("--mbr_only", nargs="+", default=None, metavar="FILE",
                   help="skip sampling: run MBR over existing candidate files (ours or DiffuSeq's)")
    p.add_argument("--name", default=None, help="output folder name under --out_dir (default: <run>_<split>_<setting>, "
                   "e.g. <run>_test_steps200 or <run>_test_respacingadp_20; with --mbr_only: mbr)")
    p.add_argument("--out_dir", default="generation_results")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: remove the folder's earlier results and any batches an interrupted run kept")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted decode of the same flags (the same command does it too; --resume "
                        "also refuses when there is nothing to continue)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip_bad_lines", action="store_true",
                   help="skip bad lines of the split's file (counted and logged); on if the checkpoint was trained so")
    return p.parse_args(argv)


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def mbr_rows(candidate_rows: list[list[dict]], names: list[str] | None = None) -> list[dict]:
    """Per source, the candidate row with the largest summed sentence-BLEU against the others
    (DiffuSeq's ``selectBest``, on the recovers stripped of [CLS]/[SEP]/[PAD]); the row is
    returned as it was."""
    from evaluation.seq2seq import check_same_sources, mbr_select, strip_special
    check_same_sources(candidate_rows, names)
    n = len(candidate_rows[0])
    picks = mbr_select([[strip_special(rows[i]["recover"]) for rows in candidate_rows] for i in range(n)])
    return [candidate_rows[k][i] for i, k in enumerate(picks)]


def prepare_out(folder: str, overwrite: bool) -> None:
    if os.path.exists(folder) and os.listdir(folder) and not overwrite:
        raise UserError(f"output folder {folder} already exists; pass --overwrite or choose another --name")
    os.makedirs(folder, exist_ok=True)


def run_mbr_only(args) -> None:
    from evaluation.seq2seq import read_outputs
    if len(args.mbr_only) < 2:
        raise UserError("--mbr_only needs at least 2 candidate files")
    rows = [read_outputs(p) for p in args.mbr_only]  # before the output folder is made: they may be bad
    folder = os.path.join(args.out_dir, args.name or "mbr")
    prepare_out(folder, args.overwrite)
    out = os.path.join(folder, "mbr.jsonl")
    write_text_atomic(out, jsonl(mbr_rows(rows, args.mbr_only)))
    print(f"mbr: selected among {len(rows)} candidates for {len(rows[0])} sources; wrote {out}")


@cli_main
def main(argv=None):
    args = parse_args(argv)
    heap.fix_mmap_threshold()  # $DLM_MMAP_THRESHOLD, if set: large blocks get their own mappings (common/heap.py)
    if args.mbr_only:
        if args.checkpoint:
            raise UserError("--mbr_only works on existing files; do not also give --checkpoint")
    elif not args.checkpoint:
        raise UserError("give --checkpoint (or --mbr_only FILES)")
    else:
        require_at_least_one(args, "mbr_size")
        check_decoding_flags(args)
        if args.num_examples < 0:
            raise UserError(f"--num_examples must be 0 (all) or more, got {args.num_examples}")
    with outputs.stop_on_signals("decode"):
        outputs.check_writable(args.out_dir, "--out_dir")  # before any work
        if args.mbr_only:
            return run_mbr_only(args)
        with dist.session(args.device) as info:
            decode_all(args, info)


# ---------------------------------------------------------------------------- decoding
DECODINGS = api.DECODINGS  # each process's decoding lives in runtime.api; tests/test_process_api.py reads it here


def decode_all(args, info: dist.DistInfo) -> None:
    model = api.load(args.checkpoint, info=info, task="seq2seq", weights=args.weights, flags=True)
    run = model.run
    decoding = model.decoding(args.steps, args.decode_respacing, args.sampler, args.topk, args.top_p,
                              args.temperature, not args.no_cache, start_id=args.start_id,
                              **{k: getattr(args, k) for k in ("order", "threshold", "remask", "eta", "solver")})
    args.steps = decoding.steps  # absorbing: the default 200, recorded in decode.json
    folder = os.path.join(args.out_dir, args.name or f"{run.run_name}_{args.split}_{decoding.setting}"
                                                     f"_mbr{args.mbr_size}_seed{args.seed}")
    flags = {k: v for k, v in vars(args).items()
             if k not in ("checkpoint", "name", "out_dir", "overwrite", "resume", "device", "mbr_only")}
    output = outputs.open_output(
        [os.path.join(folder, "decode.json")], os.path.join(folder, "partial"),
        {**flags, "checkpoint": run.ckpt_dir, "checkpoint_files": outputs.checkpoint_files(run.ckpt_dir),
         "device": info.device.type}, resume=args.resume, overwrite=args.overwrite, info=info, what="output folder",
        lock_dir=folder, others=("seed*.jsonl", "mbr.jsonl", "copy_source.jsonl"))
    if output is None:  # --resume found it finished
        return

    data, sources, references = load_split(args, run, info)
    if info.is_main:
        output.write_text(os.path.join(folder, "copy_source.jsonl"),
                          jsonl([{"recover": s, "reference": r, "source": s} for s, r in zip(sources, references)]))
    timings, candidates = [], []
    for seed in range(args.seed, args.seed + args.mbr_size):
        start = time.time()
        store = output.store(f"seed{seed}")
        kept = len(store.load())
        out = model.decode_batches(data["src_ids"], decoding, seed, args.batch_size, store=store)
        if out is None:  # not rank 0
            continue
        wall = time.time() - start
        calls, rows_eval = out.network_calls, out.row_evaluations
        rows = [{"recover": h, "reference": r, "source": s} for h, r, s in zip(out.texts, references, sources)]
        output.write_text(os.path.join(folder, f"seed{seed}.jsonl"), jsonl(rows))
        candidates.append(rows)
        timings.append({"seed": seed, "wall_seconds": wall, "network_calls": calls, "row_evaluations": rows_eval,
                        "resumed_batches": kept})
        how = f"{kept} batches kept from the interrupted run" if kept else f"{len(rows) / wall:.2f} sequences/s"
        print(f"decode: seed {seed}: {len(rows)} sources in {wall:.1f}s ({how}), {calls} network calls", flush=True)
    if info.is_main:
        write_summary(output, folder, args, run, decoding, candidates, timings, len(data), info)
    output.finish(info)


def load_split(args, run, info: dist.DistInfo):
    """The split's tokenised pairs (the first ``--num_examples``), and the source and reference strings
    as DiffuSeq writes them."""
    from evaluation.seq2seq import decode_like_diffuseq
    cfg, tok = run.cfg, run.tokenizer
    args.skip_bad_lines = cfg.skip_bad_lines = args.skip_bad_lines or cfg.skip_bad_lines
    with dist.main_first(info):  # rank 0 builds the datasets cache
        data, _ = load_task_data(cfg, tok, (args.split,), log=info.log)
    data = data[args.split]
    if args.num_examples:
        data = data.select(range(min(args.num_examples, len(data))))
    sources = [decode_like_diffuseq(tok, r) for r in data["src_ids"]]
    references = [decode_like_diffuseq(tok, r) for r in data["trg_ids"]]
    return data, sources, references


def write_summary(output: outputs.Output, folder: str, args, run, decoding: api.Decoding, candidates, timings,
                  num_sources: int, info: dist.DistInfo) -> None:
    """mbr.jsonl (with two or more candidates) and decode.json, written last: the flags, the process and the
    timings."""
    if args.mbr_size > 1:
        output.write_text(os.path.join(folder, "mbr.jsonl"), jsonl(mbr_rows(candidates)))
    output.write_json(os.path.join(folder, "decode.json"),
                      {"checkpoint": run.ckpt_dir, **{k: v for k, v in vars(args).items() if k != "checkpoint"},
                       "process": run.cfg.process, "cache": decoding.use_cache, "num_sources": num_sources,
                       "timings": timings, "device": str(info.device), "ranks": info.world_size, **decoding.report})
    print(f"decode: wrote {args.mbr_size} candidate file(s){' and mbr.jsonl' if args.mbr_size > 1 else ''} "
          f"and copy_source.jsonl to {folder}")


if __name__ == "__main__":
    main()
