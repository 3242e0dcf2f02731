import pytest
import torch
from transformers import TrainingArguments

from micl.data.collator import MultimodalCollator
from micl.methods import ContinualMethod, StepContext
from micl.training.trainer import MiclTrainer, model_inputs
from test_modeling import build, example


class TwoAuxiliaryLosses(ContinualMethod):
    """Yields half the CE of two other batches; records whether each graph was already freed (i.e.
    backpropagated) when the Trainer asked for the next loss."""

    def __init__(self, others):
        super().__init__()
        self.others = others
        self.freed = []

    def auxiliary_losses(self, model, batch, ctx):
        for other in self.others:
            loss = model(**model_inputs(other)).loss
            yield 0.5 * loss
            try:
                torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
                self.freed.append(False)
            except RuntimeError:  # "Trying to backward through the graph a second time"
                self.freed.append(True)


def test_auxiliary_losses_are_backpropagated_one_by_one_with_the_same_gradients(tiny_models, tmp_path):
    model, builder = build(tiny_models)
    collate = MultimodalCollator(model.tokenizer.pad_token_id)
    main = collate([example(builder, "describe.", "image", torch.randn(4, 12), "a red circle"),
                    example(builder, "what?", "audio", torch.randn(3, 6), "blue")])
    others = [collate([example(builder, "hello there", "text", None, "general kenobi")]),
              collate([example(builder, "describe.", "audio", torch.randn(2, 6), "a dog barks")])]
    params = [p for p in model.parameters() if p.requires_grad]

    model.train()
    expected_loss = model(**model_inputs(main)).loss + sum(0.5 * model(**model_inputs(o)).loss for o in others)
    expected_loss.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad()

    method = TwoAuxiliaryLosses(others)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[],
                             remove_unused_columns=False, gradient_accumulation_steps=2)
    ctx = StepContext(step=1, task=None, seen_tasks=[], model=model, train_dataset=[], run_dir=str(tmp_path))
    trainer = MiclTrainer(model=model, args=args, methods=[method], ctx=ctx)
    # an accumulation window of two micro-batches (the same one twice), as the Trainer's loop fetches it
    batches, items = trainer.get_batch_samples(iter([main, main]), 2, trainer.args.device)
    assert int(items) == 2 * int((main["labels"][:, 1:] != -100).sum())
    loss = trainer.training_step(model, batches[0], items)

    # main CE over the window's targets (half of them here); per-batch auxiliary losses averaged over 2
    torch.testing.assert_close(loss, expected_loss.detach() / 2, rtol=1e-5, atol=1e-6)
    for got, want in zip((p.grad for p in params), expected):
        torch.testing.assert_close(got, want / 2, rtol=1e-4, atol=1e-6)
    assert method.freed == [True, True]  # each graph was freed by its backward before the next forward


def test_accumulated_micro_batches_give_the_loss_and_gradient_of_one_batch(tiny_models, tmp_path):
    """Targets of different lengths: 2 micro-batches of one optimizer step = one batch of both, because
    every micro-batch's loss is divided by the target tokens of the whole window (not its own)."""
    model, builder = build(tiny_models)
    collate = MultimodalCollator(model.tokenizer.pad_token_id)
    rows = [example(builder, "describe.", "image", torch.randn(4, 12), "a red circle on the left of a blue one"),
            example(builder, "what?", "audio", torch.randn(3, 6), "blue"),
            example(builder, "describe.", "image", torch.randn(4, 12), "a dog"),
            example(builder, "what?", "audio", torch.randn(3, 6), "two loud tones and then a long silence")]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    whole = model(**model_inputs(collate(rows)))
    whole.loss.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad()

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[],
                             remove_unused_columns=False, gradient_accumulation_steps=2)
    trainer = MiclTrainer(model=model, args=args, methods=[], ctx=None)
    batches, items = trainer.get_batch_samples(iter([collate(rows[:2]), collate(rows[2:])]), 2, trainer.args.device)
    losses = [trainer.training_step(model, batch, items) for batch in batches]
    # the two micro-batches' own means differ: their average would not be the batch's mean
    first, second = (model(**model_inputs(b)).loss for b in batches)
    assert abs(float(first + second) / 2 - float(whole.loss)) > 3e-4  # (the check below allows 1.1e-4)
    torch.testing.assert_close(sum(losses), whole.loss.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip((p.grad for p in params), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


class GradientProbe(ContinualMethod):
    """At every optimizer step: the gradients it is given, the parameters before the step, and whether the
    main forward returned hidden states; with `zero`, it sets the gradients to zero (the step then changes
    nothing: AdamW without weight decay)."""

    uses_hidden_states = True

    def __init__(self, zero=False):
        super().__init__()
        self.zero, self.steps, self.hidden = zero, [], []

    def extra_loss(self, model, batch, outputs, ctx):
        self.hidden.append(None if outputs.hidden_states is None else tuple(outputs.hidden_states.shape))

    def before_optimizer_step(self, model, batches, ctx):
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        self.steps.append({"batches": len(batches), "grads": [p.grad.clone() for p in params],
                           "params": [p.detach().clone() for p in params]})
        if self.zero:
            for p in params:
                p.grad.zero_()


def test_optimizer_step_hook_sees_the_whole_window_before_clipping_and_the_step(tiny_models, tmp_path):
    model, builder = build(tiny_models)
    collate = MultimodalCollator(model.tokenizer.pad_token_id)
    rows = [example(builder, "describe.", "image", torch.randn(4, 12), "a red circle on the left"),
            example(builder, "what?", "audio", torch.randn(3, 6), "blue"),
            example(builder, "describe.", "image", torch.randn(4, 12), "a dog"),
            example(builder, "what?", "audio", torch.randn(3, 6), "two loud tones")]
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    model.train()
    model(**model_inputs(collate(rows))).loss.backward()  # the global batch in one: the gradient of a step
    expected = [p.grad.clone() for p in params]
    model.zero_grad()

    def train(method):
        with torch.no_grad():
            for p, value in zip(params, start):
                p.copy_(value)
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[],
                                 remove_unused_columns=False, gradient_accumulation_steps=2, max_steps=1,
                                 max_grad_norm=1e-3, learning_rate=1e-2, weight_decay=0.0, save_strategy="no",
                                 lr_scheduler_type="constant", dataloader_drop_last=False)
        ctx = StepContext(step=0, task=None, seen_tasks=[], model=model, train_dataset=rows, run_dir=str(tmp_path))
        trainer = MiclTrainer(model=model, args=args, train_dataset=rows, data_collator=collate, methods=[method],
                              ctx=ctx)
        trainer.train()
        return [p.detach().clone() for p in params]

    probe = GradientProbe()
    moved = train(probe)
    assert len(probe.steps) == 1 and probe.steps[0]["batches"] == 2  # once per step, with both micro-batches
    seen = probe.steps[0]
    norm = torch.cat([g.flatten() for g in seen["grads"]]).norm()
    assert norm > 1.0  # not clipped yet (max_grad_norm 1e-3)
    for got, want in zip(seen["grads"], expected):  # both micro-batches accumulated
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(p, s) for p, s in zip(seen["params"], start))  # before the optimizer step
    assert any(not torch.equal(p, s) for p, s in zip(moved, start))
    assert probe.hidden and all(shape is not None for shape in probe.hidden)  # uses_hidden_states: asked for

    zeroing = GradientProbe(zero=True)
    unmoved = train(zeroing)
    assert all(torch.equal(p, s) for p, s in zip(unmoved, start))  # the step used the hook's gradients


def test_optimizer_step_hook_is_refused_under_deepspeed(monkeypatch):
    from micl.config import RecipeConfig
    from micl.errors import ConfigError
    from micl.methods import check_capabilities

    class NeedsGradients(ContinualMethod):
        name = "needs_gradients"
        supports_deepspeed = False

    check_capabilities([NeedsGradients], RecipeConfig(), "recipe.yaml")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="recipe.yaml: method needs_gradients is not supported under DeepSpeed"):
        check_capabilities([NeedsGradients], RecipeConfig(), "recipe.yaml")
