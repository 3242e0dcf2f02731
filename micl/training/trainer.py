"""A transformers.Trainer that calls the continual-learning hooks and checkpoints only what is trained.

Within-step checkpoints (every `train.save_steps` optimizer steps) hold the trainable parameters
(LoRA + projectors), the optimizer, scheduler and RNG states, so `resume_from_checkpoint` continues a
killed step exactly; the frozen LLM is never written (538 MB for the embedded default).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
from safetensors.torch import load_file, save_file
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback
from transformers.trainer import SCHEDULER_NAME

from ..errors import ConfigError
from ..methods.base import ContinualMethod, TokenSum
from ..modeling.multimodal import model_inputs
from .loss_scale import MAIN_ITEMS, GlobalBatchScale
from ..utils.distributed import gathered
from ..utils.io import safe_torch_load

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
STEP_STATE_FILE = "method_step_state.rank{rank}.pt"
__all__ = ["MiclTrainer", "model_inputs"]


class HookCallback(TrainerCallback):
    """Tells the dataset the epoch (per-epoch random templates) and runs the epoch-end hooks."""

    def __init__(self, methods, ctx, dataset):
        self.methods = methods
        self.ctx = ctx
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is fractional when a run resumes mid-epoch (e.g. 1.5 in the second epoch): floor, not round
        self.ctx.epoch = int(math.floor((state.epoch or 0) + 1e-6))
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.ctx.epoch)

    def on_epoch_end(self, args, state, control, **kwargs):
        for method in self.methods:
            method.on_epoch_end(self.ctx)


class MiclTrainer(Trainer):
    def __init__(self, *args, methods=(), ctx=None, projector_lr=None, early_stopping=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        # compute_loss normalises every loss over the global batch itself (loss_scale.py)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        self._scale: GlobalBatchScale | None = None
        self._window: list[dict] = []  # this process's micro-batches of the current optimizer step
        self.methods = list(methods)
        self.ctx = ctx
        self._forward_kwargs = ({"output_hidden_states": True}
                                if any(m.uses_hidden_states for m in self.methods) else {})
        # DeepSpeed keeps the gradients in its own buffers and steps inside the backward: there is no point
        # between ready gradients and the step (methods that need one declare supports_deepspeed = False)
        stepping = [m.name for m in self.methods
                    if type(m).before_optimizer_step is not ContinualMethod.before_optimizer_step]
        if stepping and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(f"method {', '.join(stepping)}: its optimizer-step hook reads the gradients, which "
                              f"DeepSpeed does not keep in .grad; not supported under DeepSpeed (use DDP)")
        if ctx is not None:
            ctx.uniform_forwards = (self.accelerator.distributed_type == DistributedType.DEEPSPEED
                                    and self.accelerator.num_processes > 1)
        self.add_callback(HookCallback(self.methods, ctx, self.train_dataset))
        # after the methods' epoch ends (e.g. MoInCL's interpolation): it scores the weights they leave
        self.stateful = list(self.methods)  # objects with step_state(): saved with every checkpoint
        self.early_stopping = early_stopping
        if early_stopping is not None:
            self.add_callback(early_stopping)
            self.stateful.append(early_stopping)

    def create_optimizer(self, model=None):
        """AdamW with the projectors in their own group: they start from scratch and learn faster at a
        higher rate than the LoRA weights (as LLaVA-style projector training does)."""
        if self.optimizer is None and self.projector_lr is not None:
            decay = self.args.weight_decay
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if not n.startswith("projectors.")], "weight_decay": decay},
                {"params": [p for n, p in named if n.startswith("projectors.")], "weight_decay": decay,
                 "lr": self.projector_lr},
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return super().create_optimizer()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step, with the methods' inputs added (`augment_batch`), and the
        global item counts their losses are normalised by (loss_scale.py)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        for i, batch in enumerate(batches):
            for method in self.methods:
                batch = method.augment_batch(batch, self.ctx)
            batches[i] = batch
        self._scale = GlobalBatchScale.of_window(batches, self.methods, self.args.device,
                                                 self.accelerator.num_processes)
        self._window = batches
        return batches, self._scale.totals[MAIN_ITEMS]

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's forward and backward of one micro-batch; after the last one of an optimizer step
        (`accelerator.sync_gradients`: the backward that DDP all-reduces) the methods'
        `before_optimizer_step`, which the Trainer follows with clipping and the optimizer step. (Its
        `on_pre_optimizer_step` callback comes after the clipping.)"""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            for method in self.methods:
                method.before_optimizer_step(model, self._window, self.ctx)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training and torch.is_grad_enabled() and self._scale is not None
        scale = self._scale if training else GlobalBatchScale.of_window([inputs], self.methods, self.args.device, 1)
        auxiliary = self._auxiliary_losses(model, inputs, scale)
        outputs = model(**model_inputs(inputs), **self._forward_kwargs)
        loss = scale.resolve(TokenSum(outputs.loss_sum)) + auxiliary
        for method in self.methods:
            extra = method.extra_loss(model, inputs, outputs, self.ctx)
            if extra is not None:
                loss = loss + scale.resolve(extra)
        return (loss, outputs) if return_outputs else loss

    def _auxiliary_losses(self, model, inputs, scale) -> torch.Tensor:
        """Sum of the hooks' auxiliary losses. While training, each is backpropagated at once so that its graph
        is freed before the next forward: peak memory is one graph, not the sum of all. The returned sum is
        detached, for logging only. Under DDP their forwards and backwards run inside `no_sync`: a forward
        outside it prepares DDP's gradient reduction, and ranks with different numbers of auxiliary passes
        would then mismatch their all-reduces (the main backward reduces everything accumulated).
        Under DeepSpeed (one backward per micro-step) they are summed into the main loss instead."""
        total = torch.zeros((), device=self.args.device)
        separate = (model.training and torch.is_grad_enabled()
                    and self.accelerator.distributed_type != DistributedType.DEEPSPEED)
        with self.accelerator.no_sync(model) if separate else contextlib.nullcontext():
            for method in self.methods:
                for loss in method.auxiliary_losses(model, inputs, self.ctx):
                    loss = scale.resolve(loss)
                    if separate:
                        self.accelerator.backward(loss)
                        loss = loss.detach()
                    total = total + loss
        return total

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Called on every rank. Under DeepSpeed ZeRO-3 the trainable parameters are shards: they are
        gathered (a collective) so that `trainable.safetensors` holds full tensors that load in a single
        process; only the main process writes. (The Trainer's own DeepSpeed path would gather the whole
        frozen LLM too, and write from every rank.)"""
        model = self.accelerator.unwrap_model(self.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        with gathered(trainable):
            state = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
        if self.args.should_save:
            self._save(output_dir, state_dict=state)
        self._save_step_state(output_dir or self.args.output_dir)

    def _save_step_state(self, output_dir: str) -> None:
        """The methods' (and early stopping's) within-step state (`step_state()`), one file per rank."""
        states = [item.step_state() for item in self.stateful]
        if not any(states):
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, STEP_STATE_FILE.format(rank=self.args.process_index))
        torch.save(states, path + ".tmp")
        os.replace(path + ".tmp", path)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if isinstance(resume_from_checkpoint, str):
            path = os.path.join(resume_from_checkpoint, STEP_STATE_FILE.format(rank=self.args.process_index))
            if os.path.isfile(path):
                for item, state in zip(self.stateful, safe_torch_load(path)):
                    item.load_step_state(state)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if state_dict is None:
            state_dict = model.trainable_state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        tmp = os.path.join(output_dir, f".{TRAINABLE_FILE}.tmp")
        save_file(state, tmp)
        os.replace(tmp, os.path.join(output_dir, TRAINABLE_FILE))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model or self.model
        model = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        model.load_trainable_state_dict(load_file(os.path.join(resume_from_checkpoint, TRAINABLE_FILE)))

    # ---- DeepSpeed checkpoints without the frozen weights ---------------------------------------------
    # The Trainer leaves frozen weights out of DeepSpeed checkpoints only for a PeftModel; MultimodalLM is
    # not one, so under ZeRO-1/2 every within-step checkpoint would hold the whole frozen LLM. The frozen
    # weights of a step never change within it (methods change them between steps; the run restores them
    # from the last phase), and the trainable ones are in the checkpoint, so they are left out and the
    # module is loaded non-strictly on resume.

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # (transformers without `_prepare_for_training`, the non-strict load below, keep the frozen weights)
        if not (self.is_deepspeed_enabled and hasattr(Trainer, "_prepare_for_training")):
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import DeepSpeedSchedulerWrapper  # (exported only where DeepSpeed is installed)
        engine = self.model_wrapped
        # DeepSpeed finds the frozen weights by `named_parameters()`, which names a tied weight once: the
        # other name (e.g. a tied `lm_head.weight`, the size of the embeddings) would still be written
        frozen = [n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad]

        def drop_frozen(module, state_dict, prefix, local_metadata):
            for name in frozen:
                state_dict.pop(prefix + name, None)

        register = getattr(engine.module, "register_state_dict_post_hook", None) or \
            engine.module._register_state_dict_hook  # (torch < 2.5)
        hook = register(drop_frozen)
        try:
            engine.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        finally:
            hook.remove()
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if not (self.is_deepspeed_enabled and resume_from_checkpoint):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint, load_module_strict=False)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader
