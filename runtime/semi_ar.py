"""Semi-autoregressive generation past the canvas: a long absorbing-lm row made block by block
(MDLM's semi-AR sampler, Sahoo et al. 2024 §4; BD3-LM, Arriola et al. 2025; docs/algorithms.md §1.13).

A row of n words longer than one canvas (``Row.blocks = (W, b)``) is generated in blocks, each on a canvas
shaped like a training line: ``[CLS]``, W words, ``[SEP]``. W, the *window*, is the longest line the
checkpoint was trained on (at most max_len - 2), so every canvas is a length the model has seen.

    block 0    [CLS] prompt SLOT*(W - |prompt|) [SEP]          the first W words
    block j    [CLS] x[e - W : s] SLOT*(e - s) [SEP]           words s..e-1, e - s <= b

Block j fixes the last W - (e - s) words already made (the prompt is the first context) and generates the
next e - s <= b (``block_size``), so a block in the middle of the text is a training line whose first words
are given, as a prompt is. [CLS] always opens the canvas (every training line starts with it, at position
0) and [SEP] closes it right after the block (every training line ends so): the model never sees a [SEP]
inside the text, and the text is one stream of exactly n words. Each block draws its random numbers with
its own key (``SampleNoise(..., block=j)``), so a sample depends on (seed, its index, settings), not on the
batch; block 0 draws what a one-canvas sample of W words draws, so its words are that sample's.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from diffusion import SampleNoise
from runtime.canvas import SLOT, Row, lay_out


def spans(row: Row) -> list[tuple[int, int]]:
    """The words ``(s, e)`` (0-based, the first word after [CLS] is 0) that each block of ``row`` generates: one
    span (all its SLOTs) for a row without ``blocks``."""
    n = len(row.cells) - 2
    given = row.cells.index(SLOT) - 1 if SLOT in row.cells else n
    if row.blocks is None:
        return [(given, n)]
    window, b = row.blocks
    out = [(given, min(n, window))]
    while out[-1][1] < n:
        s = out[-1][1]
        out.append((s, min(n, s + b)))
    return out


def window_row(x: Sequence, s: int, e: int, window: int) -> tuple[Row, int]:
    """The canvas of the block making words s..e-1 of ``x`` (a long row's cells, [CLS] first, the words made so
    far in place), ``[CLS] words[lo:s] SLOT*(e - s) [SEP]``, and lo = max(0, e - W), the word at its position 1."""
    lo = max(0, e - window)
    return Row((x[0], *x[1 + lo:1 + s], *[SLOT] * (e - s), x[-1])), lo


def generate(rows: Sequence[Row], sample_ids: Sequence[int], sample: Callable, seed: int, device: torch.device,
             pad_id: int, fill_id: int) -> tuple[list[list[int]], int, int]:
    """Generate ``rows`` (one batch; rows with and without ``blocks``) block by block with ``sample`` (a
    ``Decoding.sample``: ``(ids, attention_mask, noise_mask, noise, restrict) -> SampleOutput``). Block j
    samples, in one call, the j-th canvas of every row that has one. Returns the rows' generated cells (each
    [len(cells)] token ids), the batched network calls and the sequences the network saw, over all blocks."""
    for r in rows:  # [CLS] given SLOT... [SEP]: a template or an open row is one canvas, never made in blocks
        k = r.cells.index(SLOT) if SLOT in r.cells else len(r.cells) - 1
        if r.open or any(c is not SLOT for c in r.cells[k:-1]):
            raise ValueError("only closed rows of given words then SLOTs (a length, a prompt) are made in blocks")
    x = [list(r.cells) for r in rows]
    plans = [spans(r) for r in rows]
    calls = evaluations = 0
    for j in range(max(len(p) for p in plans)):
        live = [i for i, p in enumerate(plans) if j < len(p)]
        windows = [window_row(x[i], *plans[i][j], rows[i].blocks[0] if rows[i].blocks else len(x[i]) - 2)
                   for i in live]
        ids, att, noise = (t.to(device) for t in lay_out([w for w, _ in windows], pad_id, fill_id))
        out = sample(ids, att, noise, SampleNoise(seed, [sample_ids[i] for i in live], device, block=j), None)
        made = out.x0.cpu().tolist()
        for i, (_, lo), canvas in zip(live, windows, made):
            s, e = plans[i][j]
            x[i][1 + s:1 + e] = canvas[1 + s - lo:1 + e - lo]
        calls, evaluations = calls + out.network_calls, evaluations + out.row_evaluations
    return x, calls, evaluations


def report(rows: Sequence[Row], blocks: Sequence[int], row_evaluations: int) -> dict:
    """The account of a request with rows made in blocks (predict.py's json): the window and block size, the
    blocks per sequence (``blocks``: per row), the network's evaluations per sequence over all its blocks, and
    ``joins``: for each length made in blocks, the wordpiece positions (0-based) that begin a block after the
    first (the transition into one crosses from a block into the next); {} if every row was one canvas."""
    plans = {r.blocks for r in rows if r.blocks}
    if not plans:
        return {}
    (window, block_size), = plans
    joins = {str(len(r.cells) - 2): [s for s, _ in spans(r)[1:]] for r in rows if r.blocks}
    return {"semi_ar": {"window": window, "block_size": block_size, "blocks": sum(blocks),
                        "blocks_per_sequence": sum(blocks) / len(rows),
                        "row_evaluations_per_sequence": row_evaluations / len(rows), "joins": joins}}
