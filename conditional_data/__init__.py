"""Sequence-to-sequence data: DiffuSeq-format ``{"src", "trg"}`` pairs, their tokenisation and the
``[CLS] src [SEP] | trg [SEP] [PAD]...`` canvas (or DiffusionBERT's ``[CLS] prompt(src) | trg [SEP] [PAD]...``)
that the conditional diffusion model denoises."""
from .pairs import (CANVASES, RELEASED_PROMPTS, SPLITS, TRUNCATIONS, PairCollator, extract_target, fit_pair,
                    load_pair_splits, source_ids, tokenize_pairs, validate_jsonl)

__all__ = ["CANVASES", "RELEASED_PROMPTS", "SPLITS", "TRUNCATIONS", "PairCollator", "extract_target", "fit_pair",
           "load_pair_splits", "source_ids", "tokenize_pairs", "validate_jsonl"]
