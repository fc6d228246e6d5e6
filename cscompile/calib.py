"""Calibration prompts: read a JSON Lines file, dedupe, and split into build/eval sets.

Each line is one JSON object with a required string `prompt`, an optional `task` label,
and any other fields (kept in `extra`, e.g. an answer used by evaluation). Every problem
with the file is reported as one line naming the file and line number.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cscompile.errors import UserInputError


@dataclass
class CalibRow:
    prompt: str
    task: str | None = None
    extra: dict = field(default_factory=dict)
    line: int = 0  # 1-based line number in the source file


def read_prompts(path: str | os.PathLike, max_rows: int | None = None) -> list[CalibRow]:
    """Parse a JSON Lines prompt file; stop after `max_rows` rows if given."""
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise UserInputError(f"max_rows must be a positive integer, got {max_rows!r}")
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"prompt file {path} does not exist")
    if path.is_dir():
        raise UserInputError(f"prompt file {path} is a directory, expected a .jsonl file")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise UserInputError(f"prompt file {path} is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserInputError(f"cannot read prompt file {path}: {e.strerror or e}") from None

    rows: list[CalibRow] = []
    for line_no, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if line_no == 1 and line_bytes.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 BOM
            line_bytes = line_bytes[3:]
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise UserInputError(f"{path} line {line_no}: not valid UTF-8") from None
        if not line.strip():
            continue
        rows.append(_parse_row(path, line_no, line))
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise UserInputError(f"{path} has no rows: expected one JSON object per line")
    return rows


def _parse_row(path: Path, line_no: int, line: str) -> CalibRow:
    where = f"{path} line {line_no}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserInputError(f"{where}: invalid JSON ({e.msg})") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise UserInputError(f"{where}: invalid JSON ({str(e).split(':')[0][:100]})") from None
    except RecursionError:
        raise UserInputError(f"{where}: invalid JSON (nested too deeply)") from None
    if "\\u" in line:  # only a \u escape can smuggle in a lone surrogate (not valid Unicode)
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise UserInputError(f"{where}: a \\u escape encodes a lone surrogate, which is not "
                                 f"valid Unicode") from None
    if not isinstance(obj, dict):
        raise UserInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = obj.pop("prompt", None)
    if prompt is None:
        raise UserInputError(f"{where}: missing required field 'prompt'")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserInputError(f"{where}: field 'prompt' must be a non-empty string")
    task = obj.pop("task", None)
    if task is not None and not isinstance(task, str):
        raise UserInputError(f"{where}: field 'task' must be a string")
    return CalibRow(prompt=prompt, task=task, extra=obj, line=line_no)


def prompt_hash(text: str) -> str:
    """sha256 hex of the UTF-8 prompt: lets evaluation detect rows that built the bundle."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dedupe_prompts(rows: list[CalibRow]) -> tuple[list[CalibRow], int]:
    """Drop rows whose prompt repeats an earlier one; return (kept rows, number dropped)."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        if row.prompt not in seen:
            seen.add(row.prompt)
            kept.append(row)
    return kept, len(rows) - len(kept)


def split_rows(
    rows: list[CalibRow], n_calib: int, n_eval: int, seed: int
) -> tuple[list[CalibRow], list[CalibRow]]:
    """Deterministic disjoint (calibration, evaluation) split from a seeded permutation.

    Each part keeps file order. Rows must be deduped first, so that disjoint rows also
    mean disjoint prompts.
    """
    if n_calib < 0 or n_eval < 0:
        raise UserInputError(f"split sizes must be >= 0, got n_calib={n_calib}, n_eval={n_eval}")
    if n_calib + n_eval > len(rows):
        raise UserInputError(
            f"need {n_calib} calibration + {n_eval} evaluation prompts "
            f"but only {len(rows)} unique prompts are available"
        )
    if len({row.prompt for row in rows}) != len(rows):
        raise ValueError("split_rows needs deduped rows: call dedupe_prompts first")
    order = np.random.default_rng(seed).permutation(len(rows))
    calib_idx = sorted(order[:n_calib].tolist())
    eval_idx = sorted(order[n_calib : n_calib + n_eval].tolist())
    return [rows[i] for i in calib_idx], [rows[i] for i in eval_idx]
