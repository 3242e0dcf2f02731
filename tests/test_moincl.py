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
        Spy.seen.append((ctx.task.name, [p for p in self.pseudo if p is not None], self.teacher is not None,
                         self.pseudo_num, self.lambda_kl))


def test_pseudo_targets_only_at_a_task_type_shift_within_a_seen_modality(tiny_models, synth_root, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setitem(METHODS, "moincl", Spy)
    Spy.seen = []
    out = tmp_path / "run"
    assert run(tiny_models, synth_root, out, "order=[synth_image_caption,synth_video_qa,synth_image_qa,"
               "synth_video_caption]", "method_args.moincl.pseudo_num=[1,2,3]",
               "method_args.moincl.lambda_kl=[0.5,0.25]") == 0
    (t0, p0, teacher0, *_), (t1, p1, teacher1, *_), (t2, p2, teacher2, n2, kl2), (t3, p3, teacher3, n3, kl3) = Spy.seen
    assert not teacher0 and teacher1 and teacher2 and teacher3
    # video QA after image captioning: video is a new modality, the teacher's video projector is untrained
    assert p1 == [] and not (out / "pseudo_targets" / "step_1_synth_video_qa.json").exists()
    # image QA after image captioning: the previous model captioned every training input once (cached);
    # empty captions (a tiny random model often stops at once) are not used as targets
    cache = json.loads((out / "pseudo_targets" / "step_2_synth_image_qa.json").read_text())
    assert len(cache["targets"]) == 8
    assert [t for _, t in p2] == [t for t in cache["targets"] if t]
    # video captioning after video QA: rule-based QA pairs
    assert p3 and all(answer for _, answer in p3)
    # per-step settings from step 1 on, the last repeating
    assert (n2, kl2, n3, kl3) == (2, 0.25, 3, 0.25)
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["matrix"]) == 4
    # the teacher adapter is never saved into a phase
    assert not (out / "step_3_synth_video_caption" / "adapter" / "teacher").exists()


def test_the_per_step_pseudo_switch_overrides_the_rule(tiny_models, synth_root, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "moincl", Spy)
    Spy.seen = []
    # off where the rule says on (image captioning after image QA) and on where it says off (audio captioning
    # after image QA, audio unseen: the reference's order-2 script does this at AudioCaps)
    assert run(tiny_models, synth_root, tmp_path / "run", "order=[synth_image_qa,synth_image_caption,"
               "synth_audio_caption]", "method_args.moincl.pseudo=[false,true]") == 0
    (_, p0, *_), (_, p1, *_), (_, p2, *_) = Spy.seen
    assert p1 == [] and p2 and all(answer for _, answer in p2)


def test_the_rule():
    from micl.data.tasks import get_task
    from micl.methods.moincl import pseudo_targets_apply

    seen = [get_task("synth_audio_caption"), get_task("synth_image_caption")]
    assert not pseudo_targets_apply(get_task("synth_video_qa"), seen)  # order1, step 2
    seen.append(get_task("synth_video_qa"))
    assert pseudo_targets_apply(get_task("synth_audio_qa"), seen)  # order1, step 3
    assert pseudo_targets_apply(get_task("synth_video_caption"), seen)
    assert not pseudo_targets_apply(get_task("synth_image_caption"), seen)  # same type as learned: no shift


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
    with pytest.raises(ConfigError, match="alpha"):
        MoInCL(MoInCLArgs(alpha=[]))


def test_alpha_is_one_value_or_one_per_step():
    from micl.config import load_recipe
    from micl.methods import build_methods
    from micl.methods.moincl import per_step

    for value, expected in (("0.5", [0.5, 0.5, 0.5]), ("[0.9,0.25]", [0.9, 0.25, 0.25])):
        config = load_recipe(REPO / "recipes" / "moincl.yaml", [f"method_args.moincl.alpha={value}"])
        moincl = next(m for m in build_methods(config) if m.name == "moincl")
        assert [per_step(moincl.args.alpha, step) for step in (1, 2, 3)] == expected


def test_batched_passes_equal_separate_forwards_of_the_pseudo_rows_and_instructions(tiny_models):
    """MoInCL's pseudo-target rows, and apart from them its instructions (padded to their own length), go
    through the student (and the teacher) in one forward each that keeps only the logits it needs; the losses
    equal those of separate full-logit forwards of every row."""
    import torch
    import torch.nn.functional as F

    from micl.data.collator import MultimodalCollator
    from micl.data.dataset import EncodedTaskDataset
    from micl.data.prompts import load_templates
    from micl.data.tasks import get_task
    from micl.methods.base import StepContext
    from micl.methods.distill import target_prediction_mask
    from micl.methods.teacher import PreviousModelTeacher
    from test_modeling import build

    model, builder = build(tiny_models)
    model.eval()  # no dropout
    task = get_task("synth_image_caption")
    samples = [{"id": f"s{i}", "task": task.name, "modality": "image", "task_type": "caption", "media": "",
                "instruction": "", "target": "a red circle" + " moving up" * i, "references": ["x"]} for i in range(4)]
    torch.manual_seed(0)
    dataset = EncodedTaskDataset(samples, [{"image": torch.randn(48, 12)} for _ in samples], builder,
                                 load_templates(), train=True)
    collate = MultimodalCollator(model.tokenizer.pad_token_id)
    ctx = StepContext(step=1, task=task, seen_tasks=[get_task("synth_image_qa")], model=model,
                      train_dataset=dataset, run_dir="", batch_size=4, collate_fn=collate)
    moincl = MoInCL(MoInCLArgs(pseudo_num=2, instruction_k=3))
    moincl.teacher = PreviousModelTeacher(model)
    moincl.pseudo = [("what color is it?", "red" if i % 2 else "the red one") for i in range(4)]
    with torch.no_grad():  # the student moves away from the teacher (its LoRA too: instructions have no media)
        for p in model.projectors.parameters():
            p.add_(0.3)
        for name, p in model.named_parameters():
            if "lora_B" in name and ".teacher." not in name:
                p.add_(0.05)
    batch = moincl.augment_batch(collate([dataset[i] for i in range(4)]), ctx)
    pseudo, instructions_batch = batch["moincl"]["pseudo"], batch["moincl"]["instructions"]
    assert 0 < pseudo["logits_to_keep"] < pseudo["input_ids"].shape[1]  # long media prompts: not all logits
    assert pseudo["input_ids"].shape[0] == 2 and instructions_batch["input_ids"].shape[0] == 3
    assert instructions_batch["input_ids"].shape[1] < pseudo["input_ids"].shape[1]  # not padded to the media rows
    losses = [loss for item in moincl.auxiliary_losses(model, batch, ctx)
              for loss in (item if isinstance(item, list) else [item])]
    # the pseudo rows' CE is normalised with the batch's targets (one cross-entropy), the KLs by their own
    assert [loss.items for loss in losses] == ["labels", "moincl.pseudo", "moincl.instructions"]
    pseudo_ce, pseudo_kd, instructions = (float(loss.value.detach()) for loss in losses)

    T = moincl.args.temperature
    expected_ce = expected_kd = expected_instructions = 0.0
    for extra, is_pseudo in ((pseudo, True), (instructions_batch, False)):
        for row in range(extra["input_ids"].shape[0]):
            keep = extra["attention_mask"][row].bool()  # the row alone, unpadded, all logits
            single = {"input_ids": extra["input_ids"][row:row + 1, keep],
                      "attention_mask": extra["attention_mask"][row:row + 1, keep],
                      "media_mask": extra["media_mask"][row:row + 1, keep]}
            if is_pseudo:
                single["media_features"] = {"image": extra["media_features"]["image"][[row]]}
                single["media_rows"] = {"image": torch.tensor([0])}
            labels = extra["labels"][row:row + 1, keep]
            student = model(**single, logits_to_keep=0).logits[0]
            teacher = moincl.teacher.logits({**single, "logits_to_keep": 0})[0]
            kl = T**2 * F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1), log_target=True,
                                 reduction="none").sum(-1)
            if is_pseudo:
                mask = target_prediction_mask(labels)[0]
                ce = F.cross_entropy(student[:-1], labels[0, 1:], ignore_index=-100, reduction="sum")
                expected_ce += float(ce)
                expected_kd += float(moincl.args.lambda_kl * kl[mask].sum())
            else:
                expected_instructions += float(moincl.args.instruction_weight * kl.sum())
    assert pseudo_ce == pytest.approx(expected_ce, rel=1e-4)
    assert pseudo_kd == pytest.approx(expected_kd, rel=1e-4) and expected_kd > 1e-3
    assert instructions == pytest.approx(expected_instructions, rel=1e-4) and expected_instructions > 1e-3
    moincl.teacher.remove()
