"""Denoisers. Only networks live here; the diffusion math is in diffusion/."""
from .bert_denoiser import (OFFLINE_ALIASES, TIME_CONDITIONING, BertDenoiser, load_masked_lm,
                            resolve_model_path, sinusoidal_embedding, spare_token_ids)
from .diffuseq_transformer import DiffuSeqTransformer

__all__ = ["OFFLINE_ALIASES", "TIME_CONDITIONING", "BertDenoiser", "DiffuSeqTransformer", "load_masked_lm", "resolve_model_path",
           "sinusoidal_embedding", "spare_token_ids"]
