"""The canvas every sample is drawn on: rows of token ids, each position fixed or generated.

A row starts with its cells, ``[CLS]`` first: each cell is a token id, fixed at every step (as a seq2seq
source is), or ``SLOT``, a noised position that the process generates. After its cells a row runs to the
canvas width with fixed [PAD]s (a *closed* row: its end is given) or with noised positions (an *open* row:
the model decides where the text ends by generating [SEP] and [PAD], DiffuSeq style). Every request is
such a row:

    length n                         [CLS] SLOT*n [SEP]                closed
    prompt p, length n               [CLS] p SLOT*(n - |p|) [SEP]      closed
    template t (its [MASK]s: SLOTs)  [CLS] t [SEP]                     closed
    gaussian lm, no length           [CLS]                             open
    gaussian lm, prompt p            [CLS] p                           open
    seq2seq source                   [CLS] src [SEP]                   open
    seq2seq source, released canvas  [CLS] prompt(src)                 open    (DiffusionBERT's layout)
    absorbing lm, n > max_len - 2    [CLS] p SLOT*(n - |p|) [SEP]      closed, made in blocks of at most
                                                                        W words per canvas (runtime.semi_ar)

:func:`lay_out` turns rows into the tensors that a process's ``sample`` takes. A fixed width (the
checkpoint's max_len: every seq2seq checkpoint and a gaussian lm, as ``PairCollator`` and the gaussian lm
rows are trained) attends to every position; without one (the absorbing lm, as ``textdata.lm.Collator``)
the canvas is the batch's longest row and attends to each row's cells only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from common.errors import UserError

SLOT = None  # a cell the process generates


@dataclass(frozen=True)
class Row:
    cells: tuple            # token ids (fixed) and SLOTs (generated), [CLS] first
    open: bool = False      # the positions after the cells are generated too (else fixed [PAD]s)
    word_starts: tuple = () # SLOT cells that begin a word: never a continuation piece (##...) there
    blocks: tuple | None = None  # (window W, block size b): longer than a canvas, made in blocks (runtime.semi_ar)

    @property
    def generates(self) -> bool:
        """Whether anything on this row is generated (a row without a SLOT is its own output)."""
        return self.open or SLOT in self.cells


def lay_out(rows: Sequence[Row], pad_id: int, fill_id: int, width: int | None = None):
    """``(input_ids [B, L] long, attention_mask [B, L] long, noise_mask [B, L] bool)`` of ``rows``.

    ``noise_mask`` is True at the SLOTs and an open row's tail; the ids there are ``fill_id`` (the process
    overwrites them: [MASK] for the absorbing process, N(0, I) for the Gaussian one). ``width``: the
    canvas length, with attention everywhere; None: the longest row, attention on each row's cells.
    """
    longest = max(len(r.cells) for r in rows)
    L = longest if width is None else width
    if longest > L:
        raise ValueError(f"a row of {longest} cells does not fit the canvas of {L}")
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    noise = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, r in enumerate(rows):
        slots = torch.tensor([c is SLOT for c in r.cells], dtype=torch.bool)
        ids[i, :len(r.cells)] = torch.tensor([fill_id if c is SLOT else c for c in r.cells], dtype=torch.long)
        noise[i, :len(r.cells)] = slots
        if r.open:
            ids[i, len(r.cells):] = fill_id
            noise[i, len(r.cells):] = True
    if width is not None:
        att = torch.ones_like(ids)
    else:
        att = (torch.arange(L)[None] < torch.tensor([len(r.cells) for r in rows])[:, None]).long()
    return ids, att, noise


def word_start_mask(rows: Sequence[Row], width: int) -> torch.Tensor | None:
    """[B, width] bool: the rows' ``word_starts`` cells (positions that never take a continuation piece); None if
    no row has one."""
    if not any(r.word_starts for r in rows):
        return None
    where = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        where[i, list(r.word_starts)] = True
    return where


def text_end(row: Row, x0: Sequence[int], stop_ids: Sequence[int]) -> int:
    """Where the text of a generated row ``x0`` (ids [L]) ends: at a closed row's own [SEP] (its last cell), or
    at an open row's first ``stop_ids`` token ([SEP], [PAD]) among the generated tail (the canvas end if none)."""
    if not row.open:
        return len(row.cells) - 1
    stops = set(stop_ids)
    return next((i for i in range(len(row.cells), len(x0)) if x0[i] in stops), len(x0))


def template_cells(tokenizer, text: str, what: str) -> tuple[list, tuple]:
    """A template's cells (:func:`wordpieces` with its [MASK]s as SLOTs) and its word starts: the indices of the
    SLOTs that begin a new word (the first cell, or after a space: ``the [MASK]``, not ``the[MASK]``), where
    a continuation piece would glue a fragment onto the word before (``the ##cin`` reads ``thecin``).
    A [MASK] directly after a word (no space) may continue it."""
    cells = wordpieces(tokenizer, text, what, slots=True)
    if getattr(tokenizer, "is_fast", False):
        spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
        spaced = [j == 0 or spans[j - 1][1] < spans[j][0] for j in range(len(cells))]
    else:  # no offsets: every slot after a given token is taken to start a word
        spaced = [True] * len(cells)
    starts = tuple(j + 1 for j, c in enumerate(cells)  # + 1: [CLS] is cell 0 of the row
                   if c is SLOT and (j == 0 or (cells[j - 1] is not SLOT and spaced[j])))
    return cells, starts


def wordpieces(tokenizer, text: str, what: str, slots: bool) -> list:
    """The wordpiece ids of ``text`` (no [CLS]/[SEP] added), with each [MASK] a SLOT when ``slots``.

    One-line ``UserError`` naming ``what`` ("template 2", "prompt") for: text that is empty or not a
    string, a piece outside the vocabulary (the tokenizer gives [UNK]), and any special token other than a
    [MASK] slot ([CLS], [SEP], [PAD], [UNK] typed out; [MASK] in a prompt)."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{what} is {'empty' if isinstance(text, str) else type(text).__name__}, not a non-empty string")
    if slots and tokenizer.mask_token is not None:
        for m in re.finditer(r"\[\s*mask\s*\]", text, flags=re.IGNORECASE):
            if m.group(0) != tokenizer.mask_token:
                raise UserError(f"{what} {text!r}: {m.group(0)!r} is not a slot; a position to generate is written "
                                f"{tokenizer.mask_token} exactly")
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False, return_offsets_mapping=fast)
    ids, mask_id = enc["input_ids"], tokenizer.mask_token_id
    special = set(tokenizer.all_special_ids)
    for k, i in enumerate(ids):
        if i == mask_id and slots:
            continue
        if i == tokenizer.unk_token_id:
            span = text[slice(*enc["offset_mapping"][k])] if fast else None
            word = f"{span!r} is" if span and span != tokenizer.unk_token else "a word is"
            raise UserError(f"{what} {text!r}: {word} not in the checkpoint tokenizer's vocabulary (it gives "
                            f"{tokenizer.unk_token})")
        if i in special:
            token = tokenizer.convert_ids_to_tokens(i)
            hint = (f"; a text with {token} positions to fill in is a template" if i == mask_id else
                    f"; only {tokenizer.mask_token} marks a position to generate" if slots else "")
            raise UserError(f"{what} {text!r} holds the special token {token}, which the canvas places itself{hint}")
    return [SLOT if slots and i == mask_id else i for i in ids]
