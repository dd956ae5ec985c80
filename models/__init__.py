"""Denoisers. Only networks live here; the diffusion math is in diffusion/, loading in common/loading.py."""
from .bert_denoiser import TIME_CONDITIONING, BertDenoiser, sinusoidal_embedding, spare_token_ids
from .diffuseq_transformer import DiffuSeqTransformer

__all__ = ["TIME_CONDITIONING", "BertDenoiser", "DiffuSeqTransformer", "sinusoidal_embedding", "spare_token_ids"]
