"""Out-of-vocabulary text: words the tokenizer cannot spell become [UNK], which then trains, is scored and
shows in stored references as [UNK]. Counted once per tokenised split, with a few examples, so that it is
never silent (an emoji or a rare script in the data is a fact the user should see)."""
from __future__ import annotations

SHOW = 3  # examples quoted in the log line


def count_unknown(ds, ids_column: str, unk_id: int, keep: int = SHOW) -> tuple[int, int, list[int]]:
    """(the [UNK] tokens in ``ds[ids_column]``, the rows holding one, the first ``keep`` of those rows' indices),
    counted by arrow in chunks."""
    import pyarrow.compute as pc
    tokens = rows = start = 0
    first: list[int] = []
    for table in ds.select_columns([ids_column]).with_format("arrow").iter(batch_size=100_000):
        col = table[ids_column]
        n = int(pc.sum(pc.equal(pc.list_flatten(col), unk_id)).as_py() or 0)
        if n:  # rare: only then go through the rows
            tokens += n
            for i, ids in enumerate(col.to_pylist()):
                if unk_id in ids:
                    rows += 1
                    if len(first) < keep:
                        first.append(start + i)
        start += len(col)
    return tokens, rows, first


def unknown_examples(texts, tokenizer, limit: int = SHOW) -> list[str]:
    """The first ``limit`` distinct pieces of ``texts`` that the tokenizer maps to [UNK] (a fast tokenizer's
    offsets give the original characters)."""
    found: list[str] = []
    unk = tokenizer.unk_token_id
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if i == unk and text[a:b] not in found:
                found.append(text[a:b])
                if len(found) == limit:
                    return found
    return found


def report_unknown(ds, pairs: dict[str, str], tokenizer, where: str, log=print) -> int:
    """Log one line if the tokenised ``ds`` holds [UNK]s: ``pairs`` maps an ids column to its text column
    (``{"input_ids": "text"}``; ``{"src_ids": "src", "trg_ids": "trg"}``). Returns the [UNK] count."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return 0
    total, parts, examples = 0, [], []
    for ids_col, text_col in pairs.items():
        n, rows, first = count_unknown(ds, ids_col, unk)
        if not n:
            continue
        total += n
        parts.append(f"{text_col + ': ' if len(pairs) > 1 else ''}{n} in {rows} "
                     f"{'row' if len(pairs) > 1 else 'line'}{'s' * (rows != 1)}")
        examples += [e for e in unknown_examples(ds.select(first)[text_col], tokenizer) if e not in examples]
    if total:
        shown = ", ".join(repr(e) for e in examples[:SHOW])
        counts = parts[0].split(" ", 1)[1] if len(parts) == 1 and len(pairs) == 1 else f"({'; '.join(parts)})"
        log(f"data: {where}: {total} [UNK] token{'s' * (total != 1)} {counts}: text the tokenizer cannot spell"
            f"{f', e.g. {shown}' if shown else ''}; it trains, is scored and is stored in references as [UNK]")
    return total
