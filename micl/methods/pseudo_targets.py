"""MoInCL pseudo targets: the other task type's output for the current inputs.

- Current task QA, captioning learned before: the previous step's model captions every training input
  with the evaluation captioning prompt, batched with the KV cache, once per step (cached in the run
  folder so a resumed step reuses them).
- Current task captioning, QA learned before: question/answer pairs made from the ground-truth caption
  by the rules of `prompts/pseudo_qa.yaml`. The reference ships pairs written offline by a large text LLM;
  prompting our 135M default as a text LLM produces unusable pairs, so rules are the default: cheap,
  deterministic, and exact about the answer (it is a word of the true caption).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..data.dataset import EncodedTaskDataset
from ..errors import ConfigError
from ..utils.distributed import is_main_process, is_partitioned, map_sharded
from ..utils.io import atomic_write_json, read_yaml_mapping
from ..utils.resources import find_resource


def load_pseudo_qa_rules(path=None) -> list[dict]:
    path = Path(path) if path else find_resource("prompts/pseudo_qa.yaml")
    data = read_yaml_mapping(path, "a mapping with 'rules': a list of {question, answers}")
    rules = data.get("rules")
    if not isinstance(rules, list) or not rules:
        raise ConfigError(f"{path}: 'rules' must be a non-empty list of {{question, answers}}")
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or not isinstance(rule.get("question"), str) or not rule.get("answers"):
            raise ConfigError(f"{path}: rules[{i}] needs a 'question' string and a non-empty 'answers' list")
    return [{"question": r["question"], "answers": [str(a).lower() for a in r["answers"]]} for r in rules]


def qa_from_caption(caption: str, rules: list[dict], rng: random.Random) -> tuple[str, str] | None:
    words = re.findall(r"[a-z0-9]+", caption.lower())
    candidates = []
    for rule in rules:
        found = {w for w in words if w in rule["answers"]}
        if len(found) == 1:
            candidates.append((rule["question"], found.pop()))
    return rng.choice(candidates) if candidates else None


def caption_pseudo_targets(teacher, dataset: EncodedTaskDataset, collate_fn, batch_size: int,
                           max_new_tokens: int, cache_file: Path) -> list[str]:
    """Captions of every training input by the teacher, with the fixed captioning prompt. Under a launcher
    every process captions its share of the batches and all get every caption (map_sharded)."""
    ids = [s["id"] for s in dataset.samples]
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if cached.get("ids") == ids:
            return cached["targets"]
    prompts = EncodedTaskDataset([{**s, "task_type": "caption", "instruction": ""} for s in dataset.samples],
                                 dataset.features, dataset.builder, dataset.templates, train=False)
    jobs = [range(start, min(start + batch_size, len(prompts))) for start in range(0, len(prompts), batch_size)]
    zero3 = any(is_partitioned(p) for p in teacher.model.parameters())
    batches = map_sharded(lambda rows: teacher.generate(collate_fn([prompts[i] for i in rows]),
                                                        max_new_tokens=max_new_tokens), jobs, uniform=zero3)
    targets = [text for texts in batches for text in texts]
    if is_main_process():
        atomic_write_json(cache_file, {"ids": ids, "targets": targets})
    return targets
