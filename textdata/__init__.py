"""Offline text corpora for training and evaluating diffusion language models."""
