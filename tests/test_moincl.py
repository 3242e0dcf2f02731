import json
import random

import pytest

from conftest import REPO, tiny_recipe_overrides
from micl.cli import main
from micl.errors import ConfigError
from micl.methods import METHODS
from micl.methods.moincl import MoInCL, MoInCLArgs
from micl.methods.pseudo_targets import load_pseudo_qa_rules, qa_from_caption

RECIPE = str(REPO / "recipes" / "moincl.yaml")


def run(tiny_models, synth_root, out, *extra):
    return main(["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out),
                 "eval.forward_transfer=false", "method_args.moincl.instruction_k=2", *extra])


def test_pseudo_qa_from_caption_rules():
    rules = load_pseudo_qa_rules()
    rng = random.Random(0)
    question, answer = qa_from_caption("a red circle.", [r for r in rules if "color" in r["question"]], rng)
    assert answer == "red" and "color" in question
    # two colours: ambiguous, so no colour question
    assert qa_from_caption("a red circle and a blue square.", [r for r in rules if "color" in r["question"]], rng) is None
    assert qa_from_caption("nothing to ask here.", rules, rng) is None


class Spy(MoInCL):
    name = "moincl"
    seen: list = []

    def on_task_start(self, ctx):
        super().on_task_start(ctx)
        Spy.seen.append((ctx.task.name, [p for p in self.pseudo if p is not None], self.teacher is not None))


def test_three_task_run_pseudo_targets_only_when_other_type_learned(tiny_models, synth_root, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "moincl", Spy)
    Spy.seen = []
    out = tmp_path / "run"
    assert run(tiny_models, synth_root, out, "order=[synth_image_qa,synth_audio_qa,synth_image_caption,synth_video_qa]") == 0
    (t0, p0, teacher0), (t1, p1, teacher1), (t2, p2, teacher2), (t3, p3, teacher3) = Spy.seen
    assert not teacher0 and teacher1 and teacher2 and teacher3
    assert p0 == [] and p1 == []  # QA after QA: no captioning learned yet, so no pseudo targets
    assert p2 and all(answer for _, answer in p2)  # captioning after QA: rule-based QA pairs
    # QA after captioning: the previous model captioned every training input once (cached); empty
    # captions (a tiny random model often stops at once) are not used as targets
    cache = json.loads((out / "pseudo_targets" / "step_3_synth_video_qa.json").read_text())
    assert len(cache["targets"]) == 8
    assert [t for _, t in p3] == [t for t in cache["targets"] if t.strip()]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["matrix"]) == 4
    # the teacher adapter is never saved into a phase
    assert not (out / "step_3_synth_video_qa" / "adapter" / "teacher").exists()


@pytest.mark.parametrize("override, message", [
    ("method_args.moincl.pseudo_num=9", "pseudo_num (9) is larger than train.batch_size (4)"),
    ("method_args.moincl.alpha=[1.5]", "alpha"),
    ("method_args.moincl.instructions=/nonexistent/instructions.jsonl", "/nonexistent/instructions.jsonl"),
])
def test_bad_settings_are_clear_errors(tiny_models, synth_root, tmp_path, capsys, override, message):
    assert run(tiny_models, synth_root, tmp_path / "run", "order=[synth_image_caption]", override) == 2
    assert message in capsys.readouterr().err


def test_args_validation_without_a_run():
    with pytest.raises(ConfigError, match="alpha"):
        MoInCL(MoInCLArgs(alpha=[-0.1]))
