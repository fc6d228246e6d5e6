"""Calibration JSONL reader: error messages with line numbers, dedupe, deterministic split."""
import json

import pytest

from cscompile.calib import CalibRow, dedupe_prompts, prompt_hash, read_prompts, split_rows
from cscompile.errors import UserInputError


def _jsonl(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_rows_with_task_extra_and_line_numbers(tmp_path):
    path = _jsonl(tmp_path, [
        json.dumps({"prompt": "2+2?", "task": "math", "answer": "4", "id": 0}),
        "",
        "   ",
        json.dumps({"prompt": "def f():", "id": 1}),
    ])
    rows = read_prompts(path)
    assert rows == [
        CalibRow(prompt="2+2?", task="math", extra={"answer": "4", "id": 0}, line=1),
        CalibRow(prompt="def f():", task=None, extra={"id": 1}, line=4),
    ]
    assert read_prompts(path, max_rows=1) == rows[:1]


def test_max_rows_stops_before_later_bad_lines(tmp_path):
    path = _jsonl(tmp_path, [json.dumps({"prompt": "a"}), "{broken"])
    assert len(read_prompts(path, max_rows=1)) == 1
    with pytest.raises(UserInputError, match="line 2"):
        read_prompts(path)
    with pytest.raises(UserInputError, match="max_rows"):
        read_prompts(path, max_rows=0)


def test_utf8_bom_and_unicode(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "caf\u00e9 \u2013 \u65e5\u672c"}, ensure_ascii=False).encode())
    assert read_prompts(path)[0].prompt == "caf\u00e9 \u2013 \u65e5\u672c"


@pytest.mark.parametrize(
    "lines, message",
    [
        ([json.dumps({"prompt": "ok"})] * 6 + ['{"prompt": "x" "task": 1}'],
         r"data.jsonl line 7: invalid JSON \(Expecting ',' delimiter\)$"),
        (['{"prompt": "ok"}', '["a list"]'], r"data.jsonl line 2: expected a JSON object, got list$"),
        (['{"prompt": "ok"}', "", '{"text": "no prompt"}'], r"data.jsonl line 3: missing required field 'prompt'$"),
        (['{"prompt": ""}'], r"data.jsonl line 1: field 'prompt' must be a non-empty string$"),
        (['{"prompt": "  \\n "}'], r"line 1: field 'prompt' must be a non-empty string"),
        (['{"prompt": 5}'], r"line 1: field 'prompt' must be a non-empty string"),
        (['{"prompt": "ok", "task": 3}'], r"line 1: field 'task' must be a string"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, lines, message):
    path = _jsonl(tmp_path, lines)
    with pytest.raises(UserInputError, match=message) as info:
        read_prompts(path)
    assert "\n" not in str(info.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(UserInputError, match="data.jsonl line 2: not valid UTF-8"):
        read_prompts(path)


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(UserInputError, match="nope.jsonl does not exist"):
        read_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(UserInputError, match="is a directory"):
        read_prompts(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserInputError, match="empty.jsonl has no rows"):
        read_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    with pytest.raises(UserInputError, match="has no rows"):
        read_prompts(tmp_path / "blank.jsonl")


def test_dedupe_keeps_first_occurrence(tmp_path):
    path = _jsonl(tmp_path, [json.dumps({"prompt": p, "id": i}) for i, p in enumerate("abacba")])
    rows, n_dup = dedupe_prompts(read_prompts(path))
    assert n_dup == 3
    assert [(r.prompt, r.extra["id"], r.line) for r in rows] == [("a", 0, 1), ("b", 1, 2), ("c", 3, 4)]


def test_prompt_hash():
    assert prompt_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert prompt_hash("caf\u00e9") != prompt_hash("cafe")


def _rows(n):
    return [CalibRow(prompt=f"p{i}", line=i + 1) for i in range(n)]


def test_split_is_disjoint_deterministic_and_seeded():
    rows = _rows(50)
    calib, evals = split_rows(rows, 20, 10, seed=0)
    assert len(calib) == 20 and len(evals) == 10
    assert not {r.prompt for r in calib} & {r.prompt for r in evals}
    assert [r.line for r in calib] == sorted(r.line for r in calib)  # file order kept
    again = split_rows(rows, 20, 10, seed=0)
    assert again == (calib, evals)
    other = split_rows(rows, 20, 10, seed=1)
    assert other[0] != calib
    # not simply the first rows of the file
    assert [r.prompt for r in calib] != [r.prompt for r in rows[:20]]
    all_calib, no_eval = split_rows(rows, 50, 0, seed=3)
    assert len(all_calib) == 50 and no_eval == []


def test_split_errors():
    with pytest.raises(UserInputError, match="need 8 calibration \\+ 3 evaluation prompts but only 10"):
        split_rows(_rows(10), 8, 3, seed=0)
    with pytest.raises(UserInputError, match=">= 0"):
        split_rows(_rows(10), -1, 3, seed=0)
    with pytest.raises(ValueError, match="dedupe_prompts"):
        split_rows(_rows(3) + _rows(1), 2, 1, seed=0)


def test_real_gsm8k_file(shared_dir):
    path = shared_dir / "data" / "gsm8k" / "data.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    rows = read_prompts(path)
    n_lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    assert len(rows) == n_lines > 1000
    assert all(r.prompt and r.task == "math_gsm8k" for r in rows[:50])
    assert "answer" in rows[0].extra
    unique, _ = dedupe_prompts(rows)
    calib, evals = split_rows(unique, 64, 32, seed=0)
    assert not {prompt_hash(r.prompt) for r in calib} & {prompt_hash(r.prompt) for r in evals}
