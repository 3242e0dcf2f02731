"""A recipe's own tasks (its `tasks:` section): a user's JSONL dataset in micl's schema trains with no code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe_overrides
from micl.cli import main
from micl.config import load_recipe
from micl.data.tasks import get_task, list_tasks, use_recipe_tasks
from micl.errors import ConfigError

# "synth_shapes_qa": a name like micl-synth's, yet none of its tasks (only the `synthetic` tasks of
# eval/tasks.yaml are generated)
TASKS = [
    {"name": "synth_shapes_qa", "modality": "image", "task_type": "qa", "metric": "exact_match",
     "data": "my/shapes"},
    {"name": "tones_caption", "modality": "audio", "task_type": "caption"},
]
QUESTIONS = [("what is shown?", "a shape"), ("is it bright?", "yes"), ("how many shapes?", "one")]
CAPTIONS = ["a short tone", "a beep then silence", "two quick beeps", "a low hum"]


def _user_dataset(synth_root: Path, root: Path) -> None:
    """The two tasks' JSONL under `root` (media copied from micl-synth: any files of the modality do)."""
    for spec, source in ((TASKS[0], "synth_image_qa"), (TASKS[1], "synth_audio_caption")):
        folder = root / spec.get("data", spec["name"])
        folder.mkdir(parents=True)
        for split, n in (("train", 8), ("val", 2), ("test", 4)):
            rows = []
            for i in range(n):
                src = sorted((synth_root / "media" / source / split).iterdir())[i]
                media = Path("media") / spec["name"] / f"{split}-{i}{src.suffix}"
                (root / media).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, root / media)
                if spec["task_type"] == "qa":
                    question, answer = QUESTIONS[i % len(QUESTIONS)]
                    text = {"instruction": question, "target": answer, "references": [answer]}
                else:
                    caption = CAPTIONS[i % len(CAPTIONS)]
                    text = {"instruction": "", "target": caption, "references": [caption, f"{caption} again"]}
                rows.append({"id": f"{split}-{i}", "task": spec["name"], "modality": spec["modality"],
                             "task_type": spec["task_type"], "media": str(media), **text})
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _recipe(tmp_path: Path, tasks=TASKS, order=("synth_shapes_qa", "tones_caption")) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"method": "finetune", "order": list(order), "tasks": tasks}))
    return str(path)


def test_user_defined_qa_and_captioning_tasks_train_end_to_end(tiny_models, synth_root, tmp_path, capsys):
    root = tmp_path / "data"
    _user_dataset(synth_root, root)
    out = tmp_path / "run"
    argv = ["train", _recipe(tmp_path), *tiny_recipe_overrides(tiny_models, synth_root, out), f"data.root={root}",
            "eval.forward_transfer=false"]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["synth_shapes_qa", "tones_caption"] and results["complete"] is True
    assert None not in results["matrix"][1]
    metrics = results["steps"][1]["metrics"]
    assert metrics["synth_shapes_qa"]["metric"] == "exact_match" and metrics["tones_caption"]["metric"] == "cider"
    assert (out / "step_0_synth_shapes_qa" / "adapter" / "adapter_config.json").is_file()
    assert (out / "step_1_tones_caption" / "projectors.safetensors").is_file()
    assert not (root / "manifest.json").exists()  # no synthetic data generated for them
    assert json.loads((out / "run_config.json").read_text())["tasks"][0]["data"] == "my/shapes"
    assert get_task("synth_shapes_qa").data == "my/shapes"

    # a task's definition is part of the run's identity: another metric would mix two scores in one matrix
    changed = [dict(TASKS[0], metric="vqa_accuracy"), TASKS[1]]
    argv[1] = _recipe(tmp_path, changed)
    assert main(argv) == 2
    assert "different settings (tasks)" in capsys.readouterr().err


def test_a_run_folder_without_tasks_in_its_run_config_still_resumes(tmp_path):
    from micl.training.run_identity import RUN_IDENTITY_KEYS, identity as _identity, with_defaults as _with_defaults

    config = load_recipe(_recipe(tmp_path, tasks=[], order=("synth_image_qa",)))
    stored = config.to_dict()
    del stored["tasks"]  # written before the section existed
    filled = _with_defaults(stored)
    assert [k for k in RUN_IDENTITY_KEYS if _identity(filled, k) != _identity(config.to_dict(), k)] == []


def test_recipe_tasks_are_known_next_to_micls_and_an_order_can_use_them(tmp_path):
    from micl.data.orders import resolve_order
    from micl.data.tasks import recipe_tasks

    config = load_recipe(_recipe(tmp_path))
    use_recipe_tasks(recipe_tasks(config.tasks, "recipe.yaml"))
    try:
        assert resolve_order(["tones_caption", "synth_image_qa"]) == ["tones_caption", "synth_image_qa"]
        assert resolve_order("synth_shapes_qa") == ["synth_shapes_qa"]
        tones = get_task("tones_caption")
        assert (tones.metric, tones.data, tones.synthetic) == ("caption", "tones_caption", False)
        assert {"synth_shapes_qa", "tones_caption", "okvqa"} <= set(list_tasks())
    finally:
        use_recipe_tasks([])
    assert "synth_shapes_qa" not in list_tasks()


@pytest.mark.parametrize("entry, message", [
    ({"name": "mine", "modality": "image"}, "'tasks[0].task_type' is required"),
    ({"name": "mine", "modality": "smell", "task_type": "qa"}, "'tasks[0].modality' must be one of image, audio"),
    ({"name": "mine", "modality": "image", "task_type": "vqa"}, "'tasks[0].task_type' must be one of caption, qa"),
    ({"name": "mine", "modality": "image", "task_type": "qa", "metric": "cider"},
     "'tasks[0].metric' must be one of vqa_accuracy, exact_match for a qa task, got 'cider'"),
    ({"name": "mine", "modality": "image", "task_type": "qa", "data": "../elsewhere"},
     "'tasks[0].data' must be a folder under data.root"),
    ({"name": "mine", "modality": "image", "task_type": "qa", "colour": "red"}, "unknown key 'tasks[0].colour'"),
    ({"name": "my task", "modality": "image", "task_type": "qa"}, "'tasks[0].name' must be letters, digits"),
    ({"name": "okvqa", "modality": "image", "task_type": "qa"},
     "'tasks[0].name' 'okvqa' is one of micl's tasks (eval/tasks.yaml)"),
    ("mine", "'tasks[0]' must be a mapping"),
])
def test_bad_task_entries_are_one_line_errors_naming_the_key(tmp_path, entry, message):
    recipe = _recipe(tmp_path, tasks=[entry], order=("synth_image_qa",))
    with pytest.raises(ConfigError) as err:  # when the recipe is loaded (`micl train` prints it, exit code 2)
        load_recipe(recipe)
    assert str(err.value).startswith(f"{recipe}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_a_task_defined_twice_and_a_tasks_section_that_is_no_list(tmp_path):
    twice = [TASKS[1], TASKS[1]]
    with pytest.raises(ConfigError, match=r"'tasks\[1\].name' 'tones_caption' is defined twice"):
        load_recipe(_recipe(tmp_path, tasks=twice))
    with pytest.raises(ConfigError, match=r"'tasks' must be a list of \{name, modality, task_type, metric, data\}"):
        load_recipe(_recipe(tmp_path, tasks=TASKS[1]))
