import json
from collections import Counter
from pathlib import Path

import pytest

from micl.data.instructions import default_instructions_path, load_instructions
from micl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
REPO_FILE = REPO / "prompts" / "instructions.jsonl"


def _rows():
    raw = REPO_FILE.read_bytes().decode("utf-8")  # valid UTF-8
    rows = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        assert line.strip(), f"blank line {lineno}"
        row = json.loads(line)
        assert isinstance(row, dict), lineno
        assert set(row) == {"id", "category", "instruction"}, lineno
        for k in ("id", "category", "instruction"):
            assert isinstance(row[k], str) and row[k].strip(), (lineno, k)
        rows.append(row)
    return rows


def test_shipped_file_is_valid_and_diverse():
    rows = _rows()
    instrs = [r["instruction"] for r in rows]
    assert len({s.strip().lower() for s in instrs}) == len(instrs) >= 200
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(len(s) <= 400 for s in instrs)
    counts = Counter(r["category"] for r in rows)
    assert len(counts) >= 15
    assert min(counts.values()) >= 10, counts


def test_loader_reads_shipped_file():
    assert default_instructions_path() == REPO_FILE
    got = load_instructions()
    assert got == [r["instruction"] for r in _rows()]


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=r"nope\.jsonl.*instruction file not found"):
        load_instructions(p)


def _write(tmp_path, lines):
    p = tmp_path / "instr.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_bad_json_line(tmp_path):
    p = _write(tmp_path, ['{"instruction": "ok"}', '{"instruction": "broken'])
    with pytest.raises(ConfigError, match=r"instr\.jsonl: line 2: bad JSON"):
        load_instructions(p)


def test_non_object_line(tmp_path):
    p = _write(tmp_path, ['["a list"]'])
    with pytest.raises(ConfigError, match=r"instr\.jsonl: line 1: expected a JSON object"):
        load_instructions(p)


@pytest.mark.parametrize("bad", ['{"id": "x"}', '{"instruction": ""}', '{"instruction": "   "}',
                                 '{"instruction": 3}'])
def test_missing_or_empty_instruction(tmp_path, bad):
    p = _write(tmp_path, ['{"instruction": "fine"}', "", bad])
    with pytest.raises(ConfigError, match=r"instr\.jsonl: line 3: missing or empty 'instruction'"):
        load_instructions(p)


def test_no_instructions(tmp_path):
    p = _write(tmp_path, ["", "  "])
    with pytest.raises(ConfigError, match=r"instr\.jsonl: no instructions"):
        load_instructions(p)


def test_blank_lines_skipped(tmp_path):
    p = _write(tmp_path, ['{"instruction": " a "}', "", '{"instruction": "b", "category": "c"}'])
    assert load_instructions(p) == ["a", "b"]
