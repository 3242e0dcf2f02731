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
