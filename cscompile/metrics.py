"""Teacher-forced quality of a reduced model against the dense one on the same token ids.

Convention: `score_from` is the index of the first *scored token*. Token t is predicted by the
logits at position t - 1, so scores use logits[score_from - 1 : T - 1] (and, for perplexity,
targets ids[score_from:]). A prefix ids[:score_from] can thus be shown to a per-prompt method
without leaking any scored token.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .errors import UserInputError

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def _scored(logits: torch.Tensor, score_from: int) -> torch.Tensor:
    """Logits [B, T, V] (or [T, V]) -> the rows predicting tokens score_from..T-1, [n, V]."""
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    if logits.dim() != 3:
        raise UserInputError(f"logits must be [B, T, V] or [T, V], got {list(logits.shape)}")
    t = logits.shape[1]
    if not 1 <= score_from <= t - 1:
        raise UserInputError(f"score_from must be in [1, {t - 1}] for {t} positions, "
                             f"got {score_from}")
    return logits[:, score_from - 1:t - 1].reshape(-1, logits.shape[-1]).double()


def compare_to_dense(dense_logits: torch.Tensor, logits: torch.Tensor, score_from: int = 1) -> dict:
    """Mean KL(dense || reduced) per scored token (nats) and top-1 agreement."""
    if dense_logits.shape != logits.shape:
        raise UserInputError(f"dense logits {list(dense_logits.shape)} and reduced logits "
                             f"{list(logits.shape)} differ in shape")
    p_log = F.log_softmax(_scored(dense_logits, score_from), dim=-1)
    q_log = F.log_softmax(_scored(logits, score_from), dim=-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    agree = (p_log.argmax(-1) == q_log.argmax(-1)).double()
    return {"kl": float(kl.mean()), "top1": float(agree.mean()), "tokens": int(kl.numel())}


def nll(logits: torch.Tensor, ids: torch.Tensor, score_from: int = 1) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ids[:, score_from:] and the token count."""
    ids = ids.view(1, -1) if ids.dim() == 1 else ids
    rows = _scored(logits, score_from)
    targets = ids[:, score_from:].reshape(-1)
    if targets.numel() != rows.shape[0]:
        raise UserInputError(f"ids {list(ids.shape)} do not match logits {list(logits.shape)}")
    return float(F.cross_entropy(rows, targets, reduction="sum")), int(targets.numel())


def perplexity(logits: torch.Tensor, ids: torch.Tensor, score_from: int = 1) -> float:
    total, n = nll(logits, ids, score_from)
    with np.errstate(over="ignore"):  # a hopeless model has infinite perplexity
        return float(np.exp(total / n))


def forwards_and_score(model, ids: torch.Tensor, score_from: int = 1, apply=None,
                       dense_logits: torch.Tensor | None = None) -> dict:
    """One teacher-forced forward (under `apply(model)` when given): logits, nll/tokens,
    perplexity and, with dense_logits, KL to dense and top-1 agreement."""
    from .frontend import logits_of

    with torch.no_grad(), (apply(model) if apply is not None else nullcontext()):
        logits = logits_of(model, ids)
    total, n = nll(logits, ids, score_from)
    out = {"logits": logits, "nll": total, "tokens": n, "ppl": float(np.exp(total / n))}
    if dense_logits is not None:
        out.update({k: v for k, v in compare_to_dense(dense_logits, logits, score_from).items()
                    if k != "tokens"})
    return out


@lru_cache(maxsize=4)
def _tokenized(tokenizer, path: str) -> np.ndarray:
    text = Path(path).read_text(encoding="utf-8")
    return np.asarray(tokenizer(text, verbose=False)["input_ids"], dtype=np.int64)


def wikitext_windows(tokenizer, path: str | Path | None = None, n_windows: int = 20,
                     window: int = 256, seed: int = 0) -> torch.Tensor:
    """`n_windows` non-overlapping windows of `window` tokens from WikiText-2 (test, raw),
    at seeded random offsets: LongTensor [n_windows, window]."""
    path = Path(path) if path is not None else WIKITEXT
    if not path.is_file():
        raise UserInputError(f"WikiText-2 file {path} does not exist")
    if tokenizer is None:
        raise UserInputError("wikitext_windows needs a tokenizer (the model has none)")
    tokens = _tokenized(tokenizer, str(path))
    slots = len(tokens) // window
    if n_windows < 1 or n_windows > slots:
        raise UserInputError(f"n_windows must be in [1, {slots}] for {path.name} at window "
                             f"{window}, got {n_windows}")
    starts = np.sort(np.random.default_rng(seed).choice(slots, size=n_windows, replace=False))
    return torch.from_numpy(np.stack([tokens[s * window:(s + 1) * window] for s in starts]))
