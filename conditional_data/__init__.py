"""Sequence-to-sequence data: DiffuSeq-format ``{"src", "trg"}`` pairs, their tokenisation and the
``[CLS] src [SEP] | trg [SEP] [PAD]...`` canvas that the conditional diffusion model denoises."""
from .pairs import (SPLITS, PairCollator, extract_target, load_pair_splits, tokenize_pairs,
                    validate_jsonl)

__all__ = ["SPLITS", "PairCollator", "extract_target", "load_pair_splits", "tokenize_pairs", "validate_jsonl"]
