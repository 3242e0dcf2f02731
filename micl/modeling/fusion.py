"""Adaptive fusion of the two media of one sample (a video and its sound), after the adaptive audio-visual
fusion module of arXiv 2506.09999 (threshold 0.8; reference code chenyukun924/MCIL-AudioCLIP).

For every batch row that has both media (rows found in `media_rows` of both modalities):

    p_v, p_a  = mean over tokens of the projected video / audio tokens             [d] each
    r         = Pearson correlation of p_v and p_a over the d feature dimensions
    w         = softmax(router_task([p_v; p_a]))                                   [2], one router per task
    r >= threshold:  fuse    video tokens * 2 w_v,  audio tokens * 2 w_a   (w = 1/2 each leaves them as they are)
    r <  threshold:  the stronger modality (larger w) alone: its tokens unchanged, the other's tokens zeroed

Choices where the paper leaves details open (docs/adaptive_fusion.md):
- r is computed per sample, not averaged over the batch as the reference does, so a sample's prediction
  does not depend on which other samples share its batch (evaluation batches differ from training ones).
- Pooled *projected* features: both modalities live in the LLM's embedding space there (same d), which a
  Pearson correlation over feature dimensions needs; the raw encoder features have different sizes.
- "Stronger" is the modality the task's router weighs more. In the alone branch the kept tokens get the
  straight-through scale 1 + w - stop_grad(w) (value 1): the router still learns there, so the choice of
  the stronger modality can change during training instead of freezing at its initial value.
- The paper's mutual-information term (0.3 L_MI next to 0.7 L_CW) becomes `paired_infonce` between p_v and
  p_a of the same sample (the method's `mi_weight`, default 0.3): with centred vectors its similarity is
  the Pearson r the gate reads, so it teaches the projectors to correlate a video with its own sound.
- The reference follows the fusion with attention; here the fused tokens go into the LLM, whose own
  self-attention attends across both token blocks.
- One router per task (a Linear 2d -> 2, zero-initialised: equal weights at the start). A row of a task
  without a router (e.g. evaluated before it is trained) uses equal weights. The method
  `adaptive_fusion` (micl/methods/adaptive_fusion.py) adds a task's router when the task starts and
  freezes it when the task ends, so later tasks cannot change how earlier tasks fuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# MultimodalOutput.aux keys
POOLED = "fusion_pooled"  # (p_v, p_a) [n, d] each of the rows with both media, in training with gradients
DECISIONS = "fusion_decisions"  # the forward's decisions, detached (rows, tasks, r, weights, fuse, stronger)


def paired_infonce(x: torch.Tensor, y: torch.Tensor, temperature: float = 0.3) -> torch.Tensor:
    """Symmetric InfoNCE of n paired vectors [n, d]: pair i is the positive of i, the other rows negatives.
    Vectors are centred over their dimensions before the cosine, so the similarity is their Pearson r: the
    loss raises the correlation the fusion gate reads for matching video/sound pairs."""
    x = F.normalize(x - x.mean(-1, keepdim=True), dim=-1)
    y = F.normalize(y - y.mean(-1, keepdim=True), dim=-1)
    logits = x @ y.T / temperature
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of x and y [n, d] over the last dimension -> [n]."""
    xc = x - x.mean(-1, keepdim=True)
    yc = y - y.mean(-1, keepdim=True)
    return (xc * yc).sum(-1) / torch.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1) + eps)


class AdaptiveFusion(nn.Module):
    def __init__(self, dim: int, threshold: float = 0.8, tasks: list[str] | tuple = (),
                 modalities: list[str] | tuple = ("video", "audio")):
        super().__init__()
        if len(modalities) != 2 or modalities[0] == modalities[1]:
            raise ValueError(f"adaptive fusion needs two different modalities, got {modalities!r}")
        self.dim = dim
        self.threshold = float(threshold)
        self.modalities = tuple(modalities)
        self.tasks: list[str] = []
        self.routers = nn.ModuleDict()  # keyed by the task's position in self.tasks (task names may hold '.')
        for task in tasks:
            self.add_task(task)

    def modulator_config(self) -> dict:
        return {"dim": self.dim, "threshold": self.threshold, "tasks": list(self.tasks),
                "modalities": list(self.modalities)}

    # ---- routers ----------------------------------------------------------------------------------------
    def add_task(self, task: str) -> nn.Linear:
        if task in self.tasks:
            return self.router(task)
        router = nn.Linear(2 * self.dim, 2)
        nn.init.zeros_(router.weight)
        nn.init.zeros_(router.bias)
        param = next(self.parameters(), None)
        if param is not None:
            router.to(device=param.device, dtype=param.dtype)
        self.routers[str(len(self.tasks))] = router
        self.tasks.append(task)
        return router

    def router(self, task: str) -> nn.Linear | None:
        return self.routers[str(self.tasks.index(task))] if task in self.tasks else None

    # ---- decisions ----------------------------------------------------------------------------------------
    def decide(self, pooled_first: torch.Tensor, pooled_second: torch.Tensor, tasks: list[str]) -> dict:
        """For n rows with pooled features [n, d] of both modalities and their task names: r [n], the
        router weights w [n, 2], fuse [n] (r >= threshold) and stronger [n] (0 = first modality)."""
        with torch.no_grad():
            r = pearson(pooled_first.float(), pooled_second.float())
        joint = torch.cat([pooled_first, pooled_second], dim=-1)
        logits = []
        for i, task in enumerate(tasks):
            router = self.router(task)
            logits.append(router(joint[i]) if router is not None else joint.new_zeros(2))
        weights = torch.softmax(torch.stack(logits).float(), dim=-1)
        return {"r": r, "weights": weights, "fuse": r >= self.threshold, "stronger": weights.argmax(-1)}

    @staticmethod
    def scales(decision: dict) -> torch.Tensor:
        """[n, 2] multipliers of the two modalities' tokens (see the module docstring)."""
        w = decision["weights"]
        alone = F.one_hot(decision["stronger"], 2).to(w.dtype) * (1 + w - w.detach())
        return torch.where(decision["fuse"][:, None], 2 * w, alone)

    def forward(self, projected: dict[str, torch.Tensor], media_rows=None, media_tasks=None,
                aux: dict | None = None) -> dict:
        """The scaled tokens; the decisions (and, in training with gradients, the pooled pairs for an
        alignment loss) go into `aux` under DECISIONS and POOLED."""
        first, second = self.modalities
        aux = {} if aux is None else aux
        if media_rows is None or first not in projected or second not in projected:
            return projected
        rows_first, rows_second = media_rows[first].tolist(), media_rows[second].tolist()
        position = {row: j for j, row in enumerate(rows_second)}
        pairs = [(i, position[row], row) for i, row in enumerate(rows_first) if row in position]
        if not pairs:
            return projected
        x, y = projected[first], projected[second]
        index_x = torch.tensor([i for i, _, _ in pairs], device=x.device)
        index_y = torch.tensor([j for _, j, _ in pairs], device=y.device)
        tasks = [media_tasks[row] if media_tasks is not None else "" for _, _, row in pairs]
        pooled_x, pooled_y = x[index_x].mean(1), y[index_y].mean(1)
        if self.training and torch.is_grad_enabled():
            aux[POOLED] = (pooled_x, pooled_y)
        decision = self.decide(pooled_x, pooled_y, tasks)
        scale = self.scales(decision)
        aux[DECISIONS] = {"rows": [row for _, _, row in pairs], "tasks": tasks,
                          **{k: v.detach() for k, v in decision.items()}}
        result = dict(projected)
        result[first] = x * x.new_ones(x.shape[0]).index_put((index_x,), scale[:, 0].to(x.dtype))[:, None, None]
        result[second] = y * y.new_ones(y.shape[0]).index_put((index_y,), scale[:, 1].to(y.dtype))[:, None, None]
        return result
