"""Evaluation metrics for generated text (BLEU, self-BLEU, distinct-n)."""
