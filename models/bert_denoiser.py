"""A BERT-family denoiser for absorbing diffusion, wrapping any ``AutoModelForMaskedLM``.

The wrapper splits the masked-LM into its encoder (``base_model``) and its head, so the
30k-way vocabulary projection runs only at the positions the diffusion process asks for.

Time conditioning (DiffusionBERT section 4.3):

* ``none``: time-agnostic decoding (TAD), the paper's best and the default. The output depends on
  ``x_t`` only, which is what lets the sampler cache it.
* ``token``: a token for t is put right after the first token ([CLS]); the ids are the tokenizer's
  spare ``[unused*]`` entries, so T may not exceed their number.
* ``layerwise``: a sinusoidal embedding of t goes through an MLP and, through one zero-initialised
  projection per layer, is added to the input of every encoder layer (zero init keeps the
  pretrained network unchanged at the start of training).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

TIME_CONDITIONING = ("none", "token", "layerwise")


def spare_token_ids(tokenizer) -> list[int]:
    """Ids of vocabulary entries that are never produced by tokenisation (``[unused0]``, ...)."""
    vocab = tokenizer.get_vocab()
    return sorted(i for tok, i in vocab.items() if re.fullmatch(r"\[unused\d+\]", tok))


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of (possibly fractional) times ``t`` [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class BertDenoiser(nn.Module):
    """``denoise(x_t, t, attention_mask, positions) -> logits``.

    Args:
        mlm: a transformers masked-LM (BERT, RoBERTa, ...).
        time_conditioning: one of ``none``, ``token``, ``layerwise``.
        num_steps: T, the number of diffusion steps (for ``token`` and ``layerwise``).
        time_token_ids: spare ids for ``token`` conditioning (at least T of them).
    """

    def __init__(self, mlm: nn.Module, time_conditioning: str = "none", num_steps: int = 2048,
                 time_token_ids: list[int] | None = None):
        super().__init__()
        if time_conditioning not in TIME_CONDITIONING:
            raise ValueError(f"unknown time conditioning {time_conditioning!r}; choose one of {TIME_CONDITIONING}")
        self.mlm = mlm
        self.time_conditioning = time_conditioning
        self.num_steps = int(num_steps)
        heads = [m for name, m in mlm.named_children() if m is not mlm.base_model]
        # The head applied to [N, H] hidden states; models whose head is not one module fall back
        # to the full forward (correct, just slower).
        self._head = heads[0] if len(heads) == 1 else None
        hidden = mlm.config.hidden_size
        if time_conditioning == "token":
            ids = list(time_token_ids or [])
            if len(ids) < self.num_steps:
                raise ValueError(
                    f"--time_conditioning token needs one spare vocabulary id per step (T={self.num_steps}) "
                    f"but the tokenizer has {len(ids)} ([unused*] entries); use --time_conditioning none "
                    f"or layerwise, or T <= {len(ids)}")
            self.register_buffer("time_token_ids", torch.tensor(ids[: self.num_steps] , dtype=torch.long), persistent=True)
        elif time_conditioning == "layerwise":
            layers = self._encoder_layers()
            self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            self.time_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in layers)
            for proj in self.time_proj:
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
            self._temb = None
            for i, layer in enumerate(layers):
                layer.register_forward_pre_hook(self._make_hook(i), with_kwargs=True)

    @property
    def time_agnostic(self) -> bool:
        return self.time_conditioning == "none"

    @property
    def vocab_size(self) -> int:
        return self.mlm.config.vocab_size

    def _encoder_layers(self):
        encoder = getattr(self.mlm.base_model, "encoder", None)
        layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
        if layers is None:
            raise ValueError(f"--time_conditioning layerwise: cannot find the encoder layers of {type(self.mlm).__name__}")
        return layers

    def _make_hook(self, i: int):
        def hook(module, args, kwargs):
            if self._temb is None:
                return None
            add = self.time_proj[i](self._temb)[:, None, :]
            if args:
                return (args[0] + add.to(args[0].dtype),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = kwargs["hidden_states"] + add.to(kwargs["hidden_states"].dtype)
            return args, kwargs
        return hook

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[N, V]`` at ``positions`` ([B, L] bool, row-major), or ``[B, L, V]`` if None."""
        if self.time_conditioning == "token":
            tok = self.time_token_ids[(t.long() - 1).clamp(0, self.num_steps - 1)][:, None]
            x_t = torch.cat([x_t[:, :1], tok, x_t[:, 1:]], dim=1)
            attention_mask = torch.cat([attention_mask[:, :1], torch.ones_like(attention_mask[:, :1]), attention_mask[:, 1:]], 1)
            if positions is not None:
                positions = torch.cat([positions[:, :1], torch.zeros_like(positions[:, :1]), positions[:, 1:]], 1)
        elif self.time_conditioning == "layerwise":
            temb = sinusoidal_embedding(t.float() * (1000.0 / self.num_steps), self.mlm.config.hidden_size)
            self._temb = self.time_mlp(temb)
        try:
            if self._head is None:
                logits = self.mlm(input_ids=x_t, attention_mask=attention_mask).logits
                if self.time_conditioning == "token" and positions is None:
                    logits = torch.cat([logits[:, :1], logits[:, 2:]], 1)
                return logits if positions is None else logits[positions]
            hidden = self.mlm.base_model(input_ids=x_t, attention_mask=attention_mask).last_hidden_state
            if positions is None:
                out = self._head(hidden)
                return torch.cat([out[:, :1], out[:, 2:]], 1) if self.time_conditioning == "token" else out
            return self._head(hidden[positions])
        finally:
            self._temb = None
