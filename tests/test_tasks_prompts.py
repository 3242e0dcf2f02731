import json
import random
import re
from pathlib import Path

import pytest

import micl.data.prompts as prompts_mod
from micl.data.orders import load_orders, resolve_order
from micl.data.prompts import load_templates, render_instruction
from micl.data.schema import MODALITIES, TASK_TYPES, validate_sample
from micl.data.synth import SYNTH_TASKS
from micl.data.tasks import TaskSpec, get_task, list_tasks, load_task_file, load_task_split
from micl.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def _row(i=0, **kw):
    row = {"id": f"r{i}", "task": "synth_image_qa", "modality": "image", "task_type": "qa",
           "media": f"media/x{i}.png", "instruction": "what color is the shape?",
           "target": "red", "references": ["red"]}
    row.update(kw)
    return row


def _write_split(root, rows, task="synth_image_qa", split="test", raw_lines=()):
    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return d / f"{split}.jsonl"


# ------------------------------------------------------------------ registry


def test_registry_has_the_synth_tasks():
    for name in SYNTH_TASKS:
        spec = get_task(name)
        assert spec.name == name
        assert spec.modality in MODALITIES and spec.task_type in TASK_TYPES
        assert spec.metric == ("caption" if spec.task_type == "caption" else "exact_match")
    assert get_task("synth_audio_caption").modality == "audio"
    assert set(SYNTH_TASKS) <= set(list_tasks())
    assert [t for t in list_tasks() if get_task(t).synthetic] == list(SYNTH_TASKS)  # what micl data synth makes


def test_the_task_table_is_read_from_eval_tasks_yaml():
    specs = load_task_file(REPO / "eval" / "tasks.yaml")
    assert [(s.name, s.modality, s.task_type, s.metric, s.data) for s in specs.values()][7:] == [
        ("flickr30k", "image", "caption", "caption", "flickr30k"), ("okvqa", "image", "qa", "vqa_accuracy", "okvqa"),
        ("msrvtt", "video", "caption", "caption", "msrvtt"), ("msvd_qa", "video", "qa", "exact_match", "msvd_qa"),
        ("audiocaps", "audio", "caption", "caption", "audiocaps"),
        ("clotho_aqa", "audio", "qa", "exact_match", "clotho_aqa")]
    assert list(specs) == list_tasks() and get_task("synth_av_caption").modality == "audio_video"


@pytest.mark.parametrize("entries, message", [
    ("[]", "'tasks' must be a non-empty list"),
    ("[{name: a, modality: image}]", "tasks[0]: missing key(s) task_type"),
    ("[{name: a, modality: image, task_type: qa, size: 3}]", "tasks[0]: unknown key(s) size"),
    ("[{name: a, modality: image, task_type: qa}, {name: a, modality: audio, task_type: qa}]",
     "tasks[1]: task 'a' is defined twice"),
    ("[{name: a, modality: image, task_type: caption, metric: exact_match}]",
     "tasks[0]: task a: unknown metric 'exact_match' for a caption task"),
    ("[{name: a, modality: image, task_type: qa, synthetic: maybe}]", "tasks[0]: task a: synthetic must be true or"),
])
def test_task_file_errors_name_the_file_and_the_entry(tmp_path, entries, message):
    path = tmp_path / "tasks.yaml"
    path.write_text(f"tasks: {entries}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_task_file(path)


def test_unknown_task_lists_known():
    with pytest.raises(DataError, match="unknown task 'flickr'.*synth_image_caption"):
        get_task("flickr")


def test_taskspec_validation():
    with pytest.raises(DataError, match="metric"):
        TaskSpec("t", "image", "qa", "bleu")
    with pytest.raises(DataError, match="modality.*valid: image, audio, video, audio_video, text"):
        TaskSpec("t", "smell", "qa", "exact_match")


# ------------------------------------------------------------------ schema


@pytest.mark.parametrize("change,msg", [
    ({"modality": "smell"}, "unknown modality 'smell' \\(valid: image, audio, video, audio_video, text\\)"),
    ({"task_type": "ranking"}, "unknown task_type 'ranking' \\(valid: caption, qa\\)"),
    ({"target": "  "}, "empty target"),
    ({"references": []}, "empty references"),
    ({"references": "red"}, "'references' must be list"),
    ({"instruction": ""}, "empty instruction"),
])
def test_validate_sample_errors(change, msg):
    with pytest.raises(DataError, match=msg) as ei:
        validate_sample(_row(7, **change), "some/file.jsonl:3")
    assert "some/file.jsonl:3" in str(ei.value) and "r7" in str(ei.value)


def test_validate_sample_missing_key():
    row = _row(1)
    del row["target"]
    with pytest.raises(DataError, match="file.jsonl.*r1.*missing key.*target"):
        validate_sample(row, "file.jsonl")


# ------------------------------------------------------------------ split loading


def test_load_split_and_max_samples(tmp_path):
    rows = [_row(i) for i in range(20)]
    _write_split(tmp_path, rows)
    got = load_task_split(tmp_path, "synth_image_qa", "test")
    assert [r["id"] for r in got] == [f"r{i}" for i in range(20)]
    five = load_task_split(tmp_path, "synth_image_qa", "test", max_samples=5)
    ten = load_task_split(tmp_path, "synth_image_qa", "test", max_samples=10)
    assert len(five) == 5 and len(ten) == 10
    assert {r["id"] for r in five} <= {r["id"] for r in ten}  # nested subsets
    assert five == load_task_split(tmp_path, "synth_image_qa", "test", max_samples=5)
    assert [r["id"] for r in five] == sorted((r["id"] for r in five), key=lambda s: int(s[1:]))
    assert len(load_task_split(tmp_path, "synth_image_qa", "test", max_samples=99)) == 20


def test_bad_row_names_file_and_line(tmp_path):
    path = _write_split(tmp_path, [_row(0), _row(1), _row(2, modality="smell")])
    with pytest.raises(DataError) as ei:
        load_task_split(tmp_path, "synth_image_qa", "test")
    msg = str(ei.value)
    assert f"{path}:3" in msg and "r2" in msg and "unknown modality" in msg


def test_invalid_json_names_file_and_line(tmp_path):
    path = _write_split(tmp_path, [_row(0)], raw_lines=["", "{not json"])
    with pytest.raises(DataError, match="invalid JSON") as ei:
        load_task_split(tmp_path, "synth_image_qa", "test")
    assert f"{path}:3" in str(ei.value)


def test_task_mismatch_and_duplicates(tmp_path):
    _write_split(tmp_path, [_row(0), _row(1, task="synth_video_qa")])
    with pytest.raises(DataError, match=":2: row id='r1'.*does not match"):
        load_task_split(tmp_path, "synth_image_qa", "test")
    _write_split(tmp_path, [_row(0), _row(0)])
    with pytest.raises(DataError, match=":2: .*duplicate id.*line 1"):
        load_task_split(tmp_path, "synth_image_qa", "test")


def test_missing_split_file(tmp_path):
    with pytest.raises(DataError, match="split file not found"):
        load_task_split(tmp_path, "synth_image_qa", "train")
    with pytest.raises(DataError, match="unknown task"):
        load_task_split(tmp_path, "nope", "train")


# ------------------------------------------------------------------ orders


def test_named_orders():
    assert resolve_order("order1") == [
        "synth_audio_caption", "synth_image_caption", "synth_video_qa",
        "synth_audio_qa", "synth_image_qa", "synth_video_caption"]
    assert resolve_order("order2") == [
        "synth_image_caption", "synth_video_caption", "synth_video_qa",
        "synth_image_qa", "synth_audio_caption", "synth_audio_qa"]
    assert resolve_order("quick") == ["synth_image_caption", "synth_audio_qa"]
    for name in ("order1", "order2"):  # the paper's six tasks; the audio-visual one is not in its orders
        assert sorted(resolve_order(name)) == sorted(t for t in SYNTH_TASKS if t != "synth_av_caption")
    assert "synth_av_caption" in resolve_order("av")


def test_order_lists_and_strings():
    assert resolve_order(["synth_video_qa", "synth_image_qa"]) == ["synth_video_qa", "synth_image_qa"]
    assert resolve_order("synth_video_qa, synth_audio_qa") == ["synth_video_qa", "synth_audio_qa"]
    assert resolve_order("synth_audio_qa") == ["synth_audio_qa"]


def test_order_errors():
    with pytest.raises(ConfigError, match=r"^order: unknown order 'order9' \(valid names: order1, order2, paper_order1, paper_order2, av, quick"):
        resolve_order("order9")
    with pytest.raises(ConfigError, match="order: unknown task 'nope'.*synth_image_qa"):
        resolve_order(["synth_image_qa", "nope"])
    with pytest.raises(ConfigError, match="order: .*more than once"):
        resolve_order(["synth_image_qa", "synth_image_qa"])
    with pytest.raises(ConfigError, match="order: .*empty"):
        resolve_order([])
    with pytest.raises(ConfigError, match="order"):
        resolve_order(3)


def test_orders_file_error(tmp_path):
    p = tmp_path / "o.yaml"
    p.write_text("a: 3\n")
    with pytest.raises(ConfigError, match=f"{p}: a: expected a non-empty list"):
        load_orders(p)


# ------------------------------------------------------------------ templates


def test_templates_structure():
    t = load_templates()
    assert prompts_mod.default_templates_path() == REPO / "prompts/templates.yaml"
    for tt in ("caption", "qa"):
        for mod in ("image", "audio", "video"):
            e = t[tt][mod]
            assert len(e["train"]) >= 6 and e["eval"] in e["train"]
    assert t["caption"]["image"]["eval"] == "describe the {modality}."
    assert t["qa"]["audio"]["eval"] == "{question}"


def test_render_eval_and_train():
    t = load_templates()
    cap = {"id": "c", "task_type": "caption", "modality": "audio", "instruction": ""}
    qa = {"id": "q", "task_type": "qa", "modality": "video",
          "instruction": "which direction does the shape move?"}
    assert render_instruction(cap, t, train=False, rng=random.Random(0)) == "describe the audio."
    assert render_instruction(qa, t, train=False, rng=None) == "which direction does the shape move?"
    rng = random.Random(0)
    cap_train = {render_instruction(cap, t, train=True, rng=rng) for _ in range(200)}
    qa_train = {render_instruction(qa, t, train=True, rng=rng) for _ in range(200)}
    assert len(cap_train) >= 6 and "describe the audio." in cap_train
    assert all("{" not in s for s in cap_train | qa_train)
    assert len(qa_train) >= 6 and all(qa["instruction"] in s for s in qa_train)
    # deterministic given the rng
    a = [render_instruction(qa, t, True, random.Random(5)) for _ in range(3)]
    b = [render_instruction(qa, t, True, random.Random(5)) for _ in range(3)]
    assert a == b


def test_render_errors():
    t = load_templates()
    with pytest.raises(DataError, match="id='q'.*empty instruction"):
        render_instruction({"id": "q", "task_type": "qa", "modality": "image",
                            "instruction": " "}, t, train=False)
    with pytest.raises(ConfigError, match="no template for task_type='qa' modality='smell'"):
        render_instruction({"id": "q", "task_type": "qa", "modality": "smell",
                            "instruction": "x?"}, t, train=False)


@pytest.mark.parametrize("text,msg", [
    ("qa:\n  image:\n    eval: 'Answer:'\n    train: ['{question}']\n", "qa.image.eval.*must contain \\{question\\}"),
    ("caption:\n  image:\n    eval: 'x {foo}'\n    train: ['x']\n", "caption.image.eval.*unknown placeholder.*\\{foo\\}"),
    ("caption:\n  image:\n    eval: 'x'\n    train: []\n", "caption.image.train: expected a non-empty list"),
    ("ranking:\n  image:\n    eval: 'x'\n    train: ['x']\n", "unknown task type key 'ranking'"),
    ("caption:\n  smell:\n    eval: 'x'\n    train: ['x']\n", "caption.smell: unknown modality"),
    ("caption: [\n", "invalid YAML"),
])
def test_bad_template_files(tmp_path, text, msg):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=msg) as ei:
        load_templates(p)
    assert str(p) in str(ei.value)
    with pytest.raises(ConfigError, match="not found"):
        load_templates(tmp_path / "missing.yaml")
