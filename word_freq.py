"""Count token ids over a training split, for the spindle noise schedule.

    python word_freq.py --model_name_or_path minilm --dataset bible
    python word_freq.py --task seq2seq --dataset qqp --data_files path/to/QQP     # counts the targets

counts the ids that the spindle schedule noises (LM: not [CLS]/[SEP]; seq2seq: the target and its
[SEP]) and writes ``word_freq/<tokenizer>__<dataset>.json``; ``train.py --schedule spindle`` reads it.
"""
from __future__ import annotations

import time

from common.cli import make_parser
from common.errors import UserError, cli_main


def parse_args(argv=None):
    p = make_parser(__doc__, whole_doc=True)
    p.add_argument("--task", default="lm", choices=("lm", "seq2seq"), help="seq2seq counts the target side")
    p.add_argument("--model_name_or_path", default="minilm", help="tokenizer: hub id, local directory, or 'minilm'")
    p.add_argument("--dataset", default="bible", help="as for train.py")
    p.add_argument("--data_files", default=None, help="as for train.py")
    p.add_argument("--data_dir", default="data", help="where the offline corpus is written")
    p.add_argument("--max_len", type=int, default=512, help="count wordpieces up to this length per example")
    p.add_argument("--skip_bad_lines", action="store_true", help="as for train.py: skip bad data lines (counted)")
    p.add_argument("--out", default=None, help="output file (default word_freq/<tokenizer>__<dataset>.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    from common.loading import load_tokenizer
    from runtime.assemble import load_task_data
    from runtime.config import TrainConfig
    from common.errors import refuse_overwrite
    from textdata import lm, word_freq

    start = time.time()
    name = word_freq.data_name(args.task, args.dataset, args.data_files)
    out = args.out or word_freq.default_path(args.model_name_or_path, name)
    refuse_overwrite(out, args.overwrite, "word-frequency file")
    tok, _ = load_tokenizer(args.model_name_or_path)
    cfg = TrainConfig(task=args.task, dataset=args.dataset, data_files=args.data_files, data_dir=args.data_dir,
                      max_len=args.max_len, skip_bad_lines=args.skip_bad_lines)
    train = load_task_data(cfg, tok, ("train",))[0]["train"]
    # count what the schedule noises: LM rows are [CLS] ... [SEP] and only the tokens between are
    # noised (DiffusionBERT counts add_special_tokens=False encodings); seq2seq targets are trg [SEP]
    # and all of it is noised
    exclude = lm.collator_for(tok).special_ids if args.task == "lm" else ()
    counts = word_freq.count_tokens(train["input_ids" if args.task == "lm" else "trg_ids"], len(tok), exclude)
    word_freq.save(out, counts, args.model_name_or_path, lm.vocab_fingerprint(tok), name, exclude)
    seen = int((counts > 0).sum())
    print(f"word_freq: {int(counts.sum())} tokens from {len(train)} training examples of {name}; "
          f"{seen} of {len(counts)} vocabulary entries seen; wrote {out} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
