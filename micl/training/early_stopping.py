"""Early stopping of one task's training on its validation score, as the MoInCL reference trains (up to 40
epochs, patience 5): after every epoch (after the methods' epoch-end hooks, e.g. MoInCL's LoRA
interpolation) the task's validation split is scored; training stops once `patience` epochs in a row did not
beat the best score, and the best epoch's trainable weights are put back when training ends.

The main process scores (as every evaluation in micl) and broadcasts the score, so all ranks take the same
decision; DDP and ZeRO-1/2 keep full weights on every rank. ZeRO-3 is refused (the weights to keep are
shards). The state (scores, best weights) is saved with every within-step checkpoint, so a killed step
resumes with it.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..utils.distributed import world_size


def broadcast_score(score: float | None) -> float:
    """The main process's score, on every rank."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return score
    box = [score]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class EarlyStopping(TrainerCallback):
    def __init__(self, model, score_fn, patience: int):
        self.model = model
        self.score_fn = score_fn  # () -> validation score, called on every rank (None except on the main one)
        self.patience = patience
        self.scores: list[float] = []
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    @property
    def epochs_without_improvement(self) -> int:
        return 0 if self.best_epoch is None else len(self.scores) - 1 - self.best_epoch

    def on_epoch_end(self, args, state, control, **kwargs):
        score = broadcast_score(self.score_fn())
        self.scores.append(float(score))
        if self.best_epoch is None or score > self.scores[self.best_epoch]:
            self.best_epoch = len(self.scores) - 1
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.trainable_state_dict().items()}
        elif self.epochs_without_improvement >= self.patience:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.best_state is not None and self.epochs_without_improvement > 0:
            self.model.load_trainable_state_dict(self.best_state)

    def summary(self) -> dict:
        return {"val_scores": list(self.scores), "best_epoch": self.best_epoch, "patience": self.patience,
                "stopped_early": self.best_epoch is not None and self.epochs_without_improvement >= self.patience}

    # within-step checkpoints (MiclTrainer saves and restores this with the methods' step state)
    def step_state(self) -> dict:
        return {"scores": list(self.scores), "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_step_state(self, state: dict) -> None:
        self.scores = list(state.get("scores", []))
        self.best_epoch = state.get("best_epoch")
        self.best_state = state.get("best_state")
