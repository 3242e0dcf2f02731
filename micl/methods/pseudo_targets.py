"""MoInCL pseudo targets: the other task type's output for the current inputs.

- Current task QA, captioning learned before: the previous step's model captions every training input
  with the evaluation captioning prompt and the evaluation's decoding settings (beams, repetition penalty;
  the reference: beam 5, 30 new tokens, penalty 1.15), batched with the KV cache, once per step (cached in
  the run folder so a resumed step reuses them), then normalised as the reference does (lower case,
  punctuation removed).
- Current task captioning, QA learned before: question/answer pairs about each input. The reference ships
  pairs written offline by a large text LLM from the ground-truth captions
  (`pseudo_targets/<dataset>_pseudo_qa_dict.json`: {id: {"Q": ..., "A": ...}}); `load_external_pseudo_qa`
  reads such a file. Without one, pairs are made from the ground-truth caption by the rules of
  `prompts/pseudo_qa.yaml`: prompting our 135M default as a text LLM produces unusable pairs, so rules are
  the default for micl-synth: cheap, deterministic, and exact about the answer (a word of the true caption).
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


def normalize_caption(text: str) -> str:
    """Lower case, punctuation removed, single spaces (the reference's treatment of pseudo captions)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def load_external_pseudo_qa(path, key: str) -> dict[str, tuple[str, str]]:
    """{id: (question, answer)} from a JSON file in the reference's format {id: {"Q": str, "A": str}}."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: no such file {path} (a JSON object {{id: {{\"Q\": question, \"A\": answer}}}})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{key}: {path} must be a non-empty JSON object {{id: {{\"Q\": question, \"A\": answer}}}}")
    pairs = {}
    for sample_id, entry in data.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("Q"), str) and isinstance(entry.get("A"), str)
                and entry["Q"].strip() and entry["A"].strip()):
            raise ConfigError(f"{key}: {path}: entry {sample_id!r} must be {{\"Q\": a question, \"A\": an answer}} "
                              f"(non-empty strings), got {entry!r}")
        pairs[str(sample_id)] = (entry["Q"].strip(), entry["A"].strip())
    return pairs


def external_pairs(pairs: dict[str, tuple[str, str]], samples: list[dict], key: str) -> list[tuple[str, str] | None]:
    """Each sample's pair, looked up by its id, the id before a '#k' caption suffix, or its media file's
    stem (the reference keys its files by image / video / audio id). Samples without one get None."""
    found = []
    for sample in samples:
        candidates = (str(sample["id"]), str(sample["id"]).split("#")[0], Path(sample.get("media") or "").stem)
        found.append(next((pairs[c] for c in candidates if c in pairs), None))
    if samples and not any(found):
        raise ConfigError(f"{key}: none of the task's {len(samples)} training samples has a pseudo QA pair (looked "
                          f"up by id, id before '#', media file stem; e.g. {samples[0]['id']!r}); is it the "
                          f"file of this dataset?")
    return found


def caption_pseudo_targets(teacher, dataset: EncodedTaskDataset, collate_fn, batch_size: int, decoding: dict,
                           cache_file: Path) -> list[str]:
    """Normalised captions of every training input by the teacher, with the fixed captioning prompt and
    `decoding` (generate's keyword arguments). Under a launcher every process captions its share of the
    batches and all get every caption (map_sharded)."""
    ids = [s["id"] for s in dataset.samples]
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if cached.get("ids") == ids and cached.get("decoding") == decoding:
            return cached["targets"]
    prompts = EncodedTaskDataset([{**s, "task_type": "caption", "instruction": ""} for s in dataset.samples],
                                 dataset.features, dataset.builder, dataset.templates, train=False)
    jobs = [range(start, min(start + batch_size, len(prompts))) for start in range(0, len(prompts), batch_size)]
    zero3 = any(is_partitioned(p) for p in teacher.model.parameters())
    batches = map_sharded(lambda rows: teacher.generate(collate_fn([prompts[i] for i in rows]), **decoding),
                          jobs, uniform=zero3)
    targets = [normalize_caption(text) for texts in batches for text in texts]
    if is_main_process():
        atomic_write_json(cache_file, {"ids": ids, "decoding": decoding, "targets": targets})
    return targets
