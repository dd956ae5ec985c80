"""Baselines that give a run's headline figures a scale, and the lines that say whether it beat them
(docs/algorithms.md §4.6).

* LM (``compute_elbo.py --baselines``): the trained model's perplexity bound beside the same bound of the
  untrained network (``runtime.assemble.initial_network``: the weights at step 0) and the perplexity of
  :class:`Unigram`, an add-one unigram model of the training split with the same length term.
* seq2seq: BLEU of the MBR output beside BLEU of copying the source (``copy_source.jsonl``).

``lm_lines`` and ``seq2seq_lines`` turn the result files into the few lines the demos end with
(``summarise.py`` prints them).
"""
from __future__ import annotations

import os

import torch

UNIGRAM_CONVENTION = ("unigram: p(v) = (c(v) + 1) / (N + V), c the token counts of the training split as the run "
                      "tokenised it (max_len), over the positions the diffusion noises ([CLS]/[SEP]/[PAD] not "
                      "counted), N their sum, V the network's vocabulary size (every id); NLL = -log p(n) (the "
                      "length term of the bound) - sum_i log p(x_i) over the same positions, divided by the same "
                      "tokens and words")


class Unigram:
    """An add-one smoothed unigram model over V ids: ``p(v) = (c(v) + 1) / (N + V)``, ``N = sum_v c(v)``."""

    def __init__(self, counts):
        c = torch.as_tensor(counts, dtype=torch.float64)
        self.log_probs = torch.log((c + 1.0) / (c.sum() + len(c)))  # [V]

    def nll(self, x0: torch.Tensor, noise_mask: torch.Tensor) -> torch.Tensor:
        """``-sum_i log p(x0_i)`` over the positions in ``noise_mask`` (x0, noise_mask [B, L]). [B] float64."""
        logp = self.log_probs.to(x0.device)[x0]
        return -torch.where(noise_mask, logp, torch.zeros_like(logp)).sum(-1)


def beats(score: float, baseline: float, higher_is_better: bool) -> bool:
    """Strictly better: a tie does not beat the baseline (nor does a NaN)."""
    return score > baseline if higher_is_better else score < baseline


def verdict(score: float, baselines: dict[str, float], higher_is_better: bool) -> str:
    """``beats both`` / ``beats NAME`` / ``does not beat NAME`` / ``beats A, does not beat B`` /
    ``beats neither`` (for two baselines, in the order given)."""
    won = [n for n, v in baselines.items() if beats(score, v, higher_is_better)]
    lost = [n for n in baselines if n not in won]
    if not lost:
        return "beats both" if len(won) == 2 else "beats " + " and ".join(won)
    if not won:
        return "beats neither" if len(lost) == 2 else "does not beat " + " or ".join(lost)
    return f"beats {' and '.join(won)}, does not beat {' or '.join(lost)}"


def _num(x: float, digits: int) -> str:
    return f"{x:.3g}" if abs(x) >= 1e6 else f"{x:.{digits}f}"


def headline(what: str, figures: dict[str, float], digits: int, width: int = 0) -> str:
    """``what: a 1.0 | b 2.0 | c 3.0``, the figures starting at column ``width``."""
    return f"{what + ':':<{width}} " + " | ".join(f"{name} {_num(v, digits)}" for name, v in figures.items())


def lm_lines(res: dict) -> list[str]:
    """The LM demo's summary from ``compute_elbo.py --baselines``'s JSON: the bound per wordpiece and per word of
    the trained model, the untrained one and the unigram model, and the verdict. Lower is better; per wordpiece
    and per word divide the same total NLLs by the same counts, so there is one verdict."""
    b, exact = res["baselines"], res.get("bound") is False  # an autoregressive model's NLL is exact
    lines = [f"what it learned ({res['split']} split, {res['num_examples']} examples, "
             f"{'exact NLL' if exact else 'K=' + str(res['eval_steps'])}; lower is better):"]
    ppl = "PPL" if exact else "PPL bound"
    for key, what in (("ppl_token", f"{ppl} per wordpiece"), ("ppl_word", f"{ppl} per word")):
        lines.append("  " + headline(what, {"trained": res[key], "untrained": b["untrained"][key],
                                            "unigram": b["unigram"][key]}, 1, width=24))
    lines[1] += " -> " + verdict(res["ppl_token"], {"untrained": b["untrained"]["ppl_token"],
                                                    "unigram": b["unigram"]["ppl_token"]}, higher_is_better=False)
    lines.append("  (untrained: the same network at step 0; unigram: token frequencies of the training split)")
    return lines


def _short(settings: list[str]) -> list[str]:
    """Setting names without the part they all share up to a '-' (``run-full``, ``run-adp_20`` -> full, adp_20)."""
    if len(settings) < 2:
        return ["MBR output"] * len(settings)
    cut = os.path.commonprefix(settings).rfind("-") + 1
    return [f"MBR output ({s[cut:] or s})" for s in settings]


def seq2seq_rows(metrics_file: dict) -> list[tuple[str, float, int]]:
    """(name, BLEU, sources) of each output in a ``compute_metric.py`` JSON: one for ``--mode seq2seq``, one per
    row for ``--mode compare``."""
    m = metrics_file["metrics"]
    if metrics_file.get("mode") == "compare":
        names = _short([r["setting"] for r in m["rows"]])
        return [(n, r["bleu"], r["num_sources"]) for n, r in zip(names, m["rows"])]
    return [("MBR output", m["bleu"], m["num_sources"])]


def seq2seq_lines(metrics_file: dict, copy_file: dict) -> list[str]:
    """The seq2seq demos' summary: BLEU of each MBR output beside copying the source, and the verdict."""
    copy = copy_file["metrics"]
    lines = [f"what it learned ({copy['num_sources']} sources; higher is better):"]
    for name, bleu, n in seq2seq_rows(metrics_file):
        if n != copy["num_sources"]:
            raise ValueError(f"{name} scores {n} sources but the copy baseline {copy['num_sources']}")
        lines.append("  " + headline("BLEU", {name: bleu, "copying the source": copy["bleu"]}, 4)
                     + " -> " + verdict(bleu, {"copying": copy["bleu"]}, higher_is_better=True))
    return lines

