"""General text-only instructions (``prompts/instructions.jsonl``) for instruction-based
knowledge distillation: a frozen teacher and the student read the same instruction and the
KL divergence between their next-token distributions is minimised, so the student keeps its
general text abilities while it learns multimodal tasks.

The file holds one JSON object per line: ``{"id": ..., "category": ..., "instruction": ...}``.
Only ``instruction`` is required; blank lines are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from micl.utils.resources import find_resource
from micl.errors import ConfigError

INSTRUCTIONS_RESOURCE = "prompts/instructions.jsonl"


def default_instructions_path() -> Path:
    return find_resource(INSTRUCTIONS_RESOURCE)


def load_instructions(path=None) -> list[str]:
    """Load the distillation instructions (default: the repository's
    ``prompts/instructions.jsonl``, else the packaged copy), in file order.

    Raises ``ConfigError`` naming the file (and the line) when the file is missing, a line
    is not a JSON object, a line lacks a non-empty string ``instruction``, or the file holds
    no instruction at all.
    """
    p = Path(path) if path is not None else default_instructions_path()
    src = str(p)
    if not p.is_file():
        raise ConfigError(f"{src}: instruction file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{src}: not valid UTF-8 ({e})") from None
    except OSError as e:
        raise ConfigError(f"{src}: cannot read instruction file ({e})") from None
    out: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{src}: line {lineno}: bad JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{src}: line {lineno}: expected a JSON object with an "
                              f"'instruction' field, got {type(row).__name__}")
        instr = row.get("instruction")
        if not isinstance(instr, str) or not instr.strip():
            raise ConfigError(f"{src}: line {lineno}: missing or empty 'instruction' field")
        out.append(instr.strip())
    if not out:
        raise ConfigError(f"{src}: no instructions (need at least 1)")
    return out
