import pytest
import torch
import torch.nn.functional as F

from micl.data.collator import MultimodalCollator
from micl.methods.distill import kd_loss_sum, target_kd_loss_sum, target_prediction_mask
from micl.methods.teacher import PreviousModelTeacher
from test_modeling import build, example


def kd_loss(student, teacher, mask, T):
    return kd_loss_sum(student, teacher, mask, T) / mask.sum()


def test_kd_loss_equals_hand_computed_kl_with_temperature_and_mask():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    T = 5.0
    expected = []
    for b, i in [(0, 0), (0, 2), (1, 2)]:
        p = torch.softmax(teacher[b, i] / T, -1)
        q = torch.softmax(student[b, i] / T, -1)
        expected.append((p * (p.log() - q.log())).sum())
    assert kd_loss(student, teacher, mask, T) == pytest.approx(float(T**2 * torch.stack(expected).mean()), rel=1e-5)
    assert kd_loss(teacher, teacher, mask, T) == pytest.approx(0.0, abs=1e-6)
    # padding positions never matter
    noisy = student.clone()
    noisy[~mask] = 100.0
    assert kd_loss(noisy, teacher, mask, T) == pytest.approx(float(kd_loss(student, teacher, mask, T)), rel=1e-6)
    assert torch.allclose(kd_loss(student, teacher, mask, T), T**2 * F.kl_div(
        F.log_softmax(student[mask] / T, -1), F.log_softmax(teacher[mask] / T, -1), log_target=True,
        reduction="batchmean"))


def test_target_prediction_mask_shifts_labels():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, 6, -100]])
    assert target_prediction_mask(labels).tolist() == [[False, True, True, False], [True, True, False, False]]
    student, teacher = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    assert torch.equal(target_kd_loss_sum(student, teacher, labels, 2.0),
                       kd_loss_sum(student, teacher, target_prediction_mask(labels), 2.0))


def test_teacher_is_the_previous_model_and_stays_frozen(tiny_models):
    model, builder = build(tiny_models)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = MultimodalCollator(model.tokenizer.pad_token_id)(
        [example(builder, "describe.", "image", torch.randn(4, 12), "a red circle")])
    model.eval()
    before = model(**batch).logits
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    teacher = PreviousModelTeacher(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before
    assert torch.allclose(teacher.logits(batch), before, atol=1e-6)
    frozen = {n: p.detach().clone() for n, p in teacher.teacher_parameters().items()}
    assert frozen
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        teacher.logits(batch)  # switching adapters in and out must not unfreeze anything
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(frozen[n], p) for n, p in teacher.teacher_parameters().items())
    model.eval()
    assert not torch.allclose(model(**batch).logits, before, atol=1e-4)  # the student moved
    assert torch.allclose(teacher.logits(batch), before, atol=1e-6)  # the teacher did not
    teacher.remove()
    assert not any("teacher" in n for n, _ in model.named_parameters())


def test_interpolation_arithmetic(tiny_models):
    model, _ = build(tiny_models)
    teacher = PreviousModelTeacher(model)
    old = {n: p.detach().clone() for n, p in teacher.student_parameters().items()}
    with torch.no_grad():
        for p in teacher.student_parameters().values():
            p.add_(1.0)
    new = {n: p.detach().clone() for n, p in teacher.student_parameters().items()}
    teacher.interpolate(0.25)
    for name, p in teacher.student_parameters().items():
        assert torch.allclose(p, 0.75 * old[name] + 0.25 * new[name], atol=1e-6)


def test_lwf_distils_the_previous_model_on_current_inputs(tiny_models):
    from micl.methods.base import StepContext
    from micl.methods.lwf import LwF

    model, builder = build(tiny_models)
    batch = MultimodalCollator(model.tokenizer.pad_token_id)(
        [example(builder, "describe.", "image", torch.randn(4, 12), "a red circle")])
    ctx = StepContext(step=1, task=None, seen_tasks=[], model=model, train_dataset=None, run_dir="")
    lwf = LwF()
    lwf.on_task_start(ctx)
    model.eval()  # no dropout: student == teacher at the start of the step
    augmented = lwf.augment_batch(batch, ctx)
    loss = lwf.extra_loss(model, augmented, model(**batch), ctx)
    assert loss.items == "labels"  # summed over the target tokens, normalised by the trainer
    loss = loss.value
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in model.projectors.parameters():
            p.add_(0.5)
    loss = lwf.extra_loss(model, augmented, model(**batch), ctx).value
    assert float(loss.detach()) > 0 and loss.requires_grad
    lwf.on_task_end(ctx)
    assert not any("teacher" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("tuner, options", [("lora", {}), ("gated_lora", {}), ("moe_lora", {}),
                                            ("moe_lora", {"routing": "sample"})])
def test_teacher_equals_the_previous_model_for_every_tuner(tiny_models, tuner, options):
    """The teacher copies every weight of the student's adapter, whatever the tuner names them (gated LoRA
    keys its gates by adapter name at the end of the parameter name)."""
    from micl.adapters import build_peft_config
    from micl.config import LoraArgs
    from micl.modeling.llm import load_llm
    from micl.modeling.multimodal import MultimodalLM
    from micl.modeling.prompting import PromptBuilder

    torch.manual_seed(0)
    llm, tokenizer = load_llm(tiny_models["llm"])
    model = MultimodalLM.with_adapter(llm, tokenizer, {"image": 12}, build_peft_config(LoraArgs(type=tuner, dropout=0.0, **options)))
    with torch.no_grad():  # a trained adapter, not the initial one (LoRA B and gates start at zero)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    batch = MultimodalCollator(tokenizer.pad_token_id)(
        [example(PromptBuilder(tokenizer, ""), "describe.", "image", torch.randn(4, 12), "a red circle")])
    previous = model(**batch).logits
    teacher = PreviousModelTeacher(model)
    torch.testing.assert_close(teacher.logits(batch), previous, rtol=1e-5, atol=1e-6)
    assert teacher.teacher_parameters() and all(not p.requires_grad for p in teacher.teacher_parameters().values())
    teacher.remove()
