"""The Trainer of one step: its TrainingArguments from the recipe, the resume point among the step's
checkpoints, and the training run itself with the statistics a phase records."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from transformers import TrainingArguments

from ..config import RecipeConfig
from ..data.collator import MultimodalCollator
from ..utils.distributed import training_arguments_kwargs
from .checkpoint_layout import LayoutCallback, check_resumable
from .trainer import MiclTrainer

logger = logging.getLogger(__name__)


def _activation_checkpointing(enabled: bool) -> dict:
    """`train.gradient_checkpointing` as TrainingArguments take it (transformers 5 renamed the setting)."""
    if not enabled:
        return {}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def training_arguments(config: RecipeConfig, output_dir: Path, step: int, hidden_size: int) -> TrainingArguments:
    train = config.train
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs,
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        optim=train.optim,
        lr_scheduler_type=train.lr_scheduler,
        # a ratio: the Trainer takes it of the real optimizer steps (processes and accumulation included)
        warmup_steps=train.warmup_ratio,
        max_grad_norm=train.max_grad_norm,
        ddp_timeout=int(train.ddp_timeout),
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=1,
        seed=config.seed + step,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=train.dataloader_num_workers,
        dataloader_pin_memory=train.dataloader_pin_memory,
        **_activation_checkpointing(train.gradient_checkpointing),
        bf16=config.model.dtype == "bfloat16",
        fp16=config.model.dtype == "float16",
        # {} in a single process; under a launcher: process group, DeepSpeed JSON (docs/distributed.md)
        **training_arguments_kwargs(hidden_size),
    )


def _checkpoint_complete(folder: Path) -> bool:
    """A process killed while the Trainer writes a checkpoint leaves it partial: resume from an older one.
    Under DeepSpeed the optimizer state is DeepSpeed's own checkpoint (`latest` names its folder)."""
    optimizer = (folder / "optimizer.pt").is_file() or (folder / "latest").is_file()
    return optimizer and all((folder / name).is_file() for name in ("trainable.safetensors", "trainer_state.json"))


def resume_checkpoint(output_dir: Path, step: int) -> str | None:
    """The step's newest complete checkpoint, checked to have been written by a launch like this one."""
    checkpoints = sorted((p for p in output_dir.glob("checkpoint-*") if _checkpoint_complete(p)),
                         key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        return None
    resume = str(checkpoints[-1])
    check_resumable(resume, step)  # micl/training/checkpoint_layout.py
    logger.info("resuming step %d from %s", step, resume)
    return resume


def build_trainer(model, args: TrainingArguments, dataset, methods, ctx, config: RecipeConfig, callbacks=(),
                  early_stopping=None) -> MiclTrainer:
    return MiclTrainer(model=model, args=args, train_dataset=dataset,
                       data_collator=MultimodalCollator(model.tokenizer.pad_token_id), methods=methods, ctx=ctx,
                       callbacks=[LayoutCallback(), *callbacks], projector_lr=config.train.projector_lr,
                       early_stopping=early_stopping)


def train(trainer: MiclTrainer, step: int, epochs: int) -> dict:
    """Trains (from the newest checkpoint, if any) and returns the step's training statistics."""
    args = trainer.args
    resume = resume_checkpoint(Path(args.output_dir), step)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    dataset = trainer.train_dataset
    epochs_done = trainer.state.epoch or epochs  # fewer when stopped early
    tokens = round(sum(dataset.input_length(i) for i in range(len(dataset))) * epochs_done)
    # mean of the logged losses: the Trainer's own training_loss only covers the part after a resume
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    stats = {
        "train_loss": sum(logged) / len(logged) if logged else result.training_loss,
        "train_runtime_s": time.time() - started,
        "train_tokens": tokens,
        "resumed_from": Path(resume).name if resume else None,
        "optimizer_steps": trainer.state.global_step,
        "warmup_steps": args.get_warmup_steps(trainer.state.max_steps),
        "log_history": trainer.state.log_history,
    }
    if trainer.early_stopping is not None:
        stats["early_stopping"] = trainer.early_stopping.summary()
    return stats
