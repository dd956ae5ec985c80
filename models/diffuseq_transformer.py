"""The DiffuSeq denoiser: a BERT encoder trained from scratch on word embeddings (Gong et al. 2023, §3).

Shapes: ``z`` [B, L, D] with D = ``emb_dim`` (128 in the paper), hidden size H.

    z --Linear(D,H)-tanh-Linear(H,H)--> + position embedding + time embedding
      --> LayerNorm, dropout --> BertEncoder (from a config, random init) --Linear(H,H)-tanh-Linear(H,D)--> x0_hat

The time embedding is sinusoidal(D) of ``t * 1000 / T`` followed by Linear(D, 4D) -> SiLU ->
Linear(4D, H). The word embedding table (N(0, 1) init) is shared by the forward process (z0 = Emb(w)),
the clamping step of the sampler and the rounding head ``logits(z) = z Emb^T + b``.

The network predicts z0 (x0-parameterisation); what it predicts for the source positions is never
used, because the process resets them.
"""
from __future__ import annotations

import torch
from torch import nn

from .bert_denoiser import sinusoidal_embedding


class DiffuSeqTransformer(nn.Module):
    """``denoise(z_t, t) -> x0_hat`` plus the embedding table and the tied rounding head.

    Args:
        vocab_size: V, the tokenizer's size.
        emb_dim: D, the word-embedding (diffusion) dimension.
        hidden_size, num_layers, num_heads: the BERT encoder's size (bert-base: 768, 12, 12).
        max_len: the number of learned positions.
        num_steps: T, to rescale t to [0, 1000) before the sinusoidal embedding.
        dropout: dropout of the embeddings and the encoder.
    """

    def __init__(self, vocab_size: int, emb_dim: int = 128, hidden_size: int = 768, num_layers: int = 12,
                 num_heads: int = 12, max_len: int = 128, num_steps: int = 2000, dropout: float = 0.1):
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEncoder

        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of the {num_heads} attention heads")
        self.vocab_size, self.emb_dim, self.num_steps = vocab_size, emb_dim, num_steps
        self.config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                 num_attention_heads=num_heads, intermediate_size=4 * hidden_size,
                                 hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                 max_position_embeddings=max_len, attn_implementation="sdpa")
        self.word_embedding = nn.Embedding(vocab_size, emb_dim)
        nn.init.normal_(self.word_embedding.weight, 0.0, 1.0)
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.time_embed = nn.Sequential(nn.Linear(emb_dim, 4 * emb_dim), nn.SiLU(), nn.Linear(4 * emb_dim, hidden_size))
        self.input_up_proj = nn.Sequential(nn.Linear(emb_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, hidden_size))
        self.position_embeddings = nn.Embedding(max_len, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=self.config.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.encoder = BertEncoder(self.config)
        self.output_down_proj = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, emb_dim))

    @property
    def embedding_weight(self) -> torch.Tensor:
        """The table Emb [V, D] (clamping and rounding use this very tensor)."""
        return self.word_embedding.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Emb(w): [B, L] -> [B, L, D]."""
        return self.word_embedding(ids)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The rounding head tied to Emb: [..., D] -> [..., V]."""
        return nn.functional.linear(z, self.word_embedding.weight, self.lm_bias)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0_hat [B, L, D] from ``z_t`` [B, L, D] and integer steps ``t`` [B] in [0, T)."""
        L = z_t.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {L} exceeds the model's {self.position_embeddings.num_embeddings} positions")
        t_emb = self.time_embed(sinusoidal_embedding(t.float() * (1000.0 / self.num_steps), self.emb_dim))
        h = self.input_up_proj(z_t) + self.position_embeddings.weight[:L][None] + t_emb[:, None]
        h = self.encoder(self.dropout(self.layer_norm(h))).last_hidden_state
        return self.output_down_proj(h)
