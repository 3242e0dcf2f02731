"""Each part of MoInCL does what it should, and the tests fail when it is switched off: the pseudo rows as a
share of one cross-entropy, instruction-based distillation, LoRA interpolation, the pseudo captions'
decoding, externally written pseudo QA pairs."""

import json

import pytest
import torch

from micl.data.collator import MultimodalCollator
from micl.data.dataset import EncodedTaskDataset
from micl.data.prompts import load_templates
from micl.data.tasks import get_task
from micl.errors import ConfigError
from micl.methods.base import StepContext, TokenSum
from micl.methods.moincl import MoInCL, MoInCLArgs
from micl.methods.pseudo_targets import external_pairs, load_external_pseudo_qa, normalize_caption
from micl.methods.teacher import PreviousModelTeacher
from micl.modeling.multimodal import MultimodalLM, model_inputs
from micl.modeling.prompting import target_tokens
from micl.training.loss_scale import GlobalBatchScale
from test_modeling import build


def setting(tiny_models, task_name="synth_image_qa", seen=("synth_image_caption",), n=4, **kwargs):
    model, builder = build(tiny_models)
    model.eval()  # no dropout anywhere
    task = get_task(task_name)
    samples = [{"id": f"s{i}#0", "task": task.name, "modality": task.modality, "task_type": task.task_type,
                "media": f"images/{100 + i}.png", "instruction": "what color is the shape?" if task.task_type == "qa"
                else "", "target": ["red", "a blue square on the left.", "green", "a red circle."][i % 4],
                "references": ["x"]} for i in range(n)]
    torch.manual_seed(1)
    dataset = EncodedTaskDataset(samples, [{"image": torch.randn(6, 12)} for _ in samples], builder,
                                 load_templates(), train=True)
    collate = MultimodalCollator(model.tokenizer.pad_token_id)
    ctx = StepContext(step=1, task=task, seen_tasks=[get_task(t) for t in seen], model=model, train_dataset=dataset,
                      run_dir=kwargs.pop("run_dir", ""), batch_size=n, collate_fn=collate,
                      decoding=kwargs.pop("decoding", {}))
    return model, dataset, collate, ctx, MoInCL(MoInCLArgs(**kwargs))


def with_teacher(moincl, model, pseudo):
    moincl.teacher = PreviousModelTeacher(model)
    moincl.pseudo = pseudo
    with torch.no_grad():  # the student moves away from the teacher
        for name, p in model.named_parameters():
            if "lora_B" in name and ".teacher." not in name:
                p.add_(0.05)


def test_pseudo_rows_are_a_share_of_one_cross_entropy_over_all_target_tokens(tiny_models):
    model, dataset, collate, ctx, moincl = setting(tiny_models, pseudo_num=2, instruction_k=0)
    with_teacher(moincl, model, [("describe the image.", "a red circle on the left.")] * 4)
    batch = moincl.augment_batch(collate([dataset[i] for i in range(4)]), ctx)
    assert "pseudo" in batch.get("moincl", {}), "pseudo batches switched off"
    main_targets = int(target_tokens(batch["labels"]))
    pseudo_targets = int(target_tokens(batch["moincl"]["pseudo"]["labels"]))
    assert pseudo_targets > 0
    scale = GlobalBatchScale.of_window([batch], [moincl], "cpu", 1)
    main = model(**model_inputs(batch))
    ce, kd = next(iter(moincl.auxiliary_losses(model, batch, ctx)))
    loss = scale.resolve(TokenSum(main.loss_sum)) + scale.resolve(ce)
    # one mean over the batch's and the pseudo rows' target tokens: each pseudo row weighs as its targets
    expected = (main.loss_sum + ce.value) / (main_targets + pseudo_targets)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert int(scale.totals["labels"]) == main_targets + pseudo_targets
    # the KL on the pseudo rows is a mean over their targets, times this step's lambda_kl
    assert float(scale.resolve(kd)) == pytest.approx(float(kd.value) / pseudo_targets, rel=1e-6)


def lora_gradients(model, moincl, batch, ctx) -> dict:
    model.zero_grad()
    scale = GlobalBatchScale.of_window([batch], [moincl], "cpu", 1)
    for loss in moincl.auxiliary_losses(model, batch, ctx):
        scale.resolve(loss).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}


def test_instruction_distillation_pulls_the_student_towards_the_teacher_on_text_only_instructions(tiny_models):
    model, dataset, collate, ctx, moincl = setting(tiny_models, pseudo_num=0, instruction_k=3)
    with_teacher(moincl, model, [])
    batch = moincl.augment_batch(collate([dataset[i] for i in range(4)]), ctx)
    assert "instructions" in batch.get("moincl", {}), "instruction distillation switched off"
    assert "pseudo" not in batch["moincl"]
    extra = batch["moincl"]["instructions"]
    assert extra["input_ids"].shape[0] == 3 and not extra.get("media_features")  # text only
    grads = lora_gradients(model, moincl, batch, ctx)
    assert grads and sum(float(g.abs().sum()) for g in grads.values()) > 0
    # a small step along the gradient lowers the KL to the teacher
    before = float(next(iter(moincl.auxiliary_losses(model, batch, ctx))).value)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, grad in grads.items():
            params[name].sub_(1e-2 * grad / max(float(g.abs().max()) for g in grads.values()))
    after = float(next(iter(moincl.auxiliary_losses(model, batch, ctx))).value)
    assert after < before
    moincl.teacher.remove()


def test_interpolation_after_every_epoch_uses_this_steps_alpha(tiny_models):
    model, dataset, collate, ctx, moincl = setting(tiny_models, alpha=[0.9, 0.25])
    ctx.step = 2
    with_teacher(moincl, model, [])
    teacher = {n.replace(".teacher.", ".default."): p.detach().clone()
               for n, p in moincl.teacher.teacher_parameters().items()}
    student = {n: p.detach().clone() for n, p in moincl.teacher.student_parameters().items()}
    assert any(not torch.equal(student[n], teacher[n]) for n in student)
    moincl.on_epoch_end(ctx)
    after = moincl.teacher.student_parameters()
    for name, value in student.items():
        assert torch.allclose(after[name], 0.75 * teacher[name] + 0.25 * value, atol=1e-7), name
    moincl.teacher.remove()


def test_pseudo_captions_use_the_evaluations_decoding_and_are_normalised(tiny_models, tmp_path, monkeypatch):
    calls = []
    original = MultimodalLM.generate

    def recording(self, batch, **kwargs):
        calls.append(kwargs)
        return [f"A Red, circle{i}!" for i in range(batch["input_ids"].shape[0])]

    monkeypatch.setattr(MultimodalLM, "generate", recording)
    decoding = {"max_new_tokens": 11, "num_beams": 3, "repetition_penalty": 1.15}
    model, dataset, collate, ctx, moincl = setting(tiny_models, run_dir=str(tmp_path), decoding=decoding,
                                                   caption_max_new_tokens=7)
    moincl.on_task_start(ctx)
    assert calls and all(c == {"max_new_tokens": 7, "num_beams": 3, "repetition_penalty": 1.15} for c in calls)
    assert [t for _, t in moincl.pseudo] == [f"a red circle{i}" for i in range(4)]
    cache = json.loads((tmp_path / "pseudo_targets" / "step_1_synth_image_qa.json").read_text())
    assert cache["decoding"]["max_new_tokens"] == 7
    moincl.on_task_end(ctx)
    # other decoding settings: the cached captions are not reused
    calls.clear()
    moincl.args.caption_max_new_tokens = None  # null: the evaluation's max_new_tokens
    moincl.on_task_start(ctx)
    assert calls and calls[0]["max_new_tokens"] == 11
    moincl.on_task_end(ctx)
    monkeypatch.setattr(MultimodalLM, "generate", original)


def test_normalize_caption():
    assert normalize_caption("  A Dog, running on the BEACH.  ") == "a dog running on the beach"


def test_external_pseudo_qa_pairs_are_used_for_a_captioning_step(tiny_models, tmp_path):
    qa = tmp_path / "shapes_pseudo_qa_dict.json"
    # keyed like the reference's files: by media id (here the image file's stem) or by sample id
    qa.write_text(json.dumps({"100": {"Q": "What is shown?", "A": "a circle"}, "s2": {"Q": "Which colour?", "A": "blue"}}))
    model, dataset, collate, ctx, moincl = setting(tiny_models, task_name="synth_image_caption",
                                                   seen=("synth_image_qa",), pseudo_qa={"synth_image_caption": str(qa)})
    moincl.on_task_start(ctx)
    targets = [p[1] if p else None for p in moincl.pseudo]
    assert targets == ["a circle", None, "blue", None]
    assert "What is shown?" in moincl.pseudo[0][0]  # the question inside the QA template
    moincl.on_task_end(ctx)


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "non-empty JSON object"),
    ("{}", "non-empty JSON object"),
    ('{"7": {"Q": "what?"}}', "entry '7'"),
    ("{not json", "not valid JSON"),
])
def test_bad_external_pseudo_qa_files_name_the_key_and_the_file(tmp_path, content, message):
    path = tmp_path / "qa.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        load_external_pseudo_qa(path, "method_args.moincl.pseudo_qa.t")
    assert "method_args.moincl.pseudo_qa.t" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ConfigError, match="no such file"):
        load_external_pseudo_qa(tmp_path / "missing.json", "k")


def test_an_external_file_of_another_dataset_is_an_error():
    pairs = {"999": ("q", "a")}
    with pytest.raises(ConfigError, match="none of the task's 1 training samples"):
        external_pairs(pairs, [{"id": "a#0", "media": "x/1.png"}], "method_args.moincl.pseudo_qa.t")
