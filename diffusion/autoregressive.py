"""The autoregressive baseline: the left-to-right factorisation ``p(x) = prod_i p(x_i | x_<i)`` on the same
BERT-shaped network as the absorbing process, with a causal attention mask (docs/algorithms.md §6).

Not a diffusion process, but it has the same verbs where they mean something: ``loss`` (next-token
cross-entropy), ``nll`` (the exact negative log-likelihood, not a bound) and ``sample`` (ancestral, left to
right, one network call per generated position). The network is a callable
``network(x, attention_mask, positions) -> logits [N, V]`` at the ``positions`` [B, L] bool (row-major) whose
logits at position j may depend on ``x[:, :j + 1]`` only (causal); this module never builds it.

The distribution over sequences ``[CLS] x_1 .. x_n [END]`` (n <= max_len - 2):

* every next-token distribution is a softmax over the vocabulary less ``excluded_ids`` ([CLS], [PAD], [MASK]:
  tokens that never follow [CLS] in the data), in training, in the NLL and in sampling alike;
* the text ends at the first ``end_id`` ([SEP]); at the last position of a ``max_len`` canvas the end is forced
  (probability 1, no network call), so a text of max_len - 2 wordpieces scores no end term: the sampler and
  the NLL describe the same normalised distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .absorbing import filter_logits
from .noise import STREAM_TOKEN, as_noise
from .outputs import SampleOutput
from .samplers import categorical_from_uniform

CausalNetwork = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ARLossOutput:
    loss: torch.Tensor         # [] mean next-token cross-entropy over the scored positions
    nll: torch.Tensor          # [B] exact NLL of each sequence (nats), float32
    num_scored: torch.Tensor   # [] number of scored next-token predictions (text wordpieces and end tokens)


class Autoregressive:
    """Left-to-right language model over a ``max_len`` canvas; ``end_id`` ends a text (module docstring)."""

    def __init__(self, end_id: int, excluded_ids: Sequence[int], max_len: int):
        if end_id in excluded_ids:
            raise ValueError(f"the end token {end_id} cannot be excluded from the vocabulary")
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 ([CLS], one wordpiece, the end), got {max_len}")
        self.end_id, self.max_len = int(end_id), int(max_len)
        self.excluded_ids = tuple(sorted({int(i) for i in excluded_ids}))

    def describe(self) -> dict:
        return {"name": "autoregressive", "end_id": self.end_id, "excluded_ids": list(self.excluded_ids),
                "max_len": self.max_len}

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``log p(. | prefix)`` [N, V] float32 from logits [N, V], the excluded tokens at -inf."""
        logits = logits.float().clone()
        logits[:, list(self.excluded_ids)] = float("-inf")
        return logits.log_softmax(-1)

    def scored(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: the positions whose token is a scored next-token prediction: every attended position
        after [CLS], except an end token at position max_len - 1 (forced there, probability 1)."""
        scored = attention_mask.bool().clone()
        scored[:, 0] = False
        if ids.shape[1] >= self.max_len:
            scored[:, self.max_len - 1:] &= ids[:, self.max_len - 1:] != self.end_id
        return scored

    def _token_nll(self, network: CausalNetwork, ids: torch.Tensor, attention_mask: torch.Tensor):
        """(``-log p(x_j | x_<j)`` [N] at the scored positions (row-major), scored [B, L] bool)."""
        scored = self.scored(ids, attention_mask)
        inputs = torch.zeros_like(scored)
        inputs[:, :-1] = scored[:, 1:]  # position j - 1 predicts position j
        logp = self.log_probs(network(ids, attention_mask, inputs))
        return -logp.gather(-1, ids[scored][:, None]).squeeze(-1), scored

    @torch.no_grad()
    def nll(self, network: CausalNetwork, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The exact ``-log p(x)`` of each row ``[CLS] x_1..x_n [END] [PAD]...`` [B, L], as [B] float32 nats.
        ``attention_mask`` [B, L]: 1 on the row's tokens, 0 on its padding (right-padded)."""
        tok_nll, scored = self._token_nll(network, ids, attention_mask)
        per_row = torch.zeros(ids.shape[0], dtype=tok_nll.dtype, device=ids.device)
        rows = scored.nonzero()[:, 0]
        return per_row.index_add_(0, rows, tok_nll)

    def loss(self, network: CausalNetwork, ids: torch.Tensor, attention_mask: torch.Tensor) -> ARLossOutput:
        """Mean next-token cross-entropy over the batch's scored positions (the end tokens included), and each
        row's exact NLL (the same numbers summed per row)."""
        tok_nll, scored = self._token_nll(network, ids, attention_mask)
        rows = scored.nonzero()[:, 0]
        nll = torch.zeros(ids.shape[0], dtype=tok_nll.dtype, device=ids.device).index_add_(0, rows, tok_nll.detach())
        return ARLossOutput(tok_nll.mean(), nll, scored.sum())

    @torch.no_grad()
    def sample(self, network: CausalNetwork, ids: torch.Tensor, noise_mask: torch.Tensor, generator=None,
               topk: int = 0, top_p: float = 1.0, temperature: float = 1.0, pad_id: int = 0) -> SampleOutput:
        """Ancestral sampling, left to right, of the ``noise_mask`` positions of ``ids`` [B, L] (each row: a fixed
        prefix, [CLS] first, then generated positions to the end of the canvas). Position j of a row that has
        not ended is drawn from ``p(. | x_<j)`` (the excluded tokens removed, then ``temperature``, ``topk`` and
        ``top_p`` as in ``filter_logits``) with the uniform of (row, j) from ``generator`` (a ``SampleNoise``:
        the row's draws do not depend on its batch). The row ends at its first end token; at position
        ``min(L, max_len) - 1`` the end is forced. After the end, [PAD]. One network call per position while a
        row is unfinished, on the unfinished rows' prefixes only (no key-value cache: the whole prefix again)."""
        B, L = ids.shape
        if bool(((noise_mask.long().cumsum(1) > 0) & ~noise_mask).any()):
            raise ValueError("the autoregressive process generates a row's tail only: a fixed prefix, then every "
                             "position to the end of the canvas")
        noise = as_noise(generator, B, ids.device)
        x, done = ids.clone(), ~noise_mask.any(1)
        last = min(L, self.max_len) - 1
        calls = evaluations = 0
        first = int(noise_mask.long().argmax(1)[~done].min()) if not bool(done.all()) else L
        for j in range(first, L):
            active = noise_mask[:, j] & ~done
            if not bool(active.any()):
                continue
            rows = active.nonzero()[:, 0]
            if j >= last:  # the canvas is full: the end is forced
                x[rows, j] = self.end_id
                done |= active
                continue
            prefix = x[rows, :j]
            where = torch.zeros_like(prefix, dtype=torch.bool)
            where[:, -1] = True
            logits = self.log_probs(network(prefix, torch.ones_like(prefix), where))
            calls, evaluations = calls + 1, evaluations + len(rows)
            probs = filter_logits(logits, topk, top_p, temperature).double().softmax(-1)
            token = categorical_from_uniform(probs, noise.rows(active).uniform(j, STREAM_TOKEN, 1)[:, 0])
            x[rows, j] = token
            done[rows] |= token == self.end_id
        ended = (x == self.end_id) & noise_mask
        after = (ended.long().cumsum(1) - ended.long()) > 0
        return SampleOutput(x.masked_fill(after & noise_mask, pad_id), calls, evaluations)
