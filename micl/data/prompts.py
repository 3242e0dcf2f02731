"""Instruction templates (``prompts/templates.yaml``) and prompt rendering.

The file maps task type -> modality -> {eval: str, train: [str, ...]}. Templates use
``{modality}`` and, for QA, ``{question}`` (the sample's ``instruction``). Training
draws a random template per example; evaluation always uses the fixed ``eval`` one.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

from micl.data.schema import MODALITIES, TASK_TYPES
from micl.errors import ConfigError, DataError
from micl.utils.io import read_yaml_mapping
from micl.utils.resources import find_resource

PLACEHOLDERS = ("modality", "question")


def default_templates_path() -> Path:
    return find_resource("prompts/templates.yaml")


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def _check_template(src: str, key: str, t, task_type: str) -> str:
    if not isinstance(t, str) or not t.strip():
        raise ConfigError(f"{src}: {key}: a template must be a non-empty string, got {t!r}")
    try:
        fields = _fields(t)
    except ValueError as e:
        raise ConfigError(f"{src}: {key}: bad template {t!r} ({e}; write literal braces "
                          f"as {{{{ and }}}})") from None
    bad = sorted(f for f in fields if f not in PLACEHOLDERS)
    if bad:
        raise ConfigError(f"{src}: {key}: unknown placeholder(s) {', '.join('{'+b+'}' for b in bad)} "
                          f"in {t!r} (allowed: {{modality}}, {{question}})")
    if task_type == "qa" and "question" not in fields:
        raise ConfigError(f"{src}: {key}: QA template {t!r} must contain {{question}}")
    if task_type != "qa" and "question" in fields:
        raise ConfigError(f"{src}: {key}: {{question}} is only available in QA templates")
    return t


def load_templates(path=None) -> dict:
    """Load and validate the template file (default: the repository's
    ``prompts/templates.yaml``, else the packaged copy).

    Returns ``{task_type: {modality: {"eval": str, "train": [str, ...]}}}``.
    """
    p = Path(path) if path is not None else default_templates_path()
    src = str(p)
    data = read_yaml_mapping(p, "a mapping task_type -> modality -> {eval, train}")
    out: dict = {}
    for tt, by_mod in data.items():
        if tt not in TASK_TYPES:
            raise ConfigError(f"{src}: unknown task type key {tt!r} (valid: {', '.join(TASK_TYPES)})")
        if not isinstance(by_mod, dict) or not by_mod:
            raise ConfigError(f"{src}: {tt}: expected a mapping modality -> {{eval, train}}")
        out[tt] = {}
        for mod, entry in by_mod.items():
            key = f"{tt}.{mod}"
            if mod not in MODALITIES:
                raise ConfigError(f"{src}: {key}: unknown modality {mod!r} "
                                  f"(valid: {', '.join(MODALITIES)})")
            if not isinstance(entry, dict) or "eval" not in entry or "train" not in entry:
                raise ConfigError(f"{src}: {key}: needs an 'eval' template and a 'train' list")
            extra = sorted(set(entry) - {"eval", "train"})
            if extra:
                raise ConfigError(f"{src}: {key}: unknown key(s) {', '.join(extra)} "
                                  f"(valid: eval, train)")
            ev = _check_template(src, f"{key}.eval", entry["eval"], tt)
            tr = entry["train"]
            if not isinstance(tr, list) or not tr:
                raise ConfigError(f"{src}: {key}.train: expected a non-empty list of templates")
            tr = [_check_template(src, f"{key}.train[{i}]", t, tt) for i, t in enumerate(tr)]
            out[tt][mod] = {"eval": ev, "train": tr}
    return out


def render_instruction(sample: dict, templates: dict, train: bool,
                       rng: random.Random | None = None) -> str:
    """The instruction text for one sample: a random ``train`` template (drawn with
    ``rng``) when ``train`` is true, else the fixed ``eval`` template."""
    tt, mod = sample.get("task_type"), sample.get("modality")
    entry = templates.get(tt, {}).get(mod) if isinstance(templates.get(tt), dict) else None
    if entry is None:
        have = [f"{t}.{m}" for t, ms in templates.items() for m in ms]
        raise ConfigError(f"templates: no template for task_type={tt!r} modality={mod!r} "
                          f"(have: {', '.join(have)})")
    if train:
        if rng is None:
            raise ValueError("render_instruction(train=True) needs an rng (random.Random)")
        template = rng.choice(entry["train"])
    else:
        template = entry["eval"]
    question = ""
    if tt == "qa":
        question = (sample.get("instruction") or "").strip()
        if not question:
            raise DataError(f"sample id={sample.get('id')!r}: QA sample with an empty "
                            f"instruction (the question)")
    return template.format(modality=mod, question=question)
