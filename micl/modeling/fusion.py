"""The media modulator of adaptive audio-visual fusion (arXiv 2506.09999; reference code
chenyukun924/MCIL-AudioCLIP), applied to the projected media tokens before they enter the LLM.

Two parts, in this order:

1. The incremental feature extractor (the paper's MIFE): one bottleneck adapter (expert) per task, added when
   the task starts, and one router per task over the experts that exist then (its own and the earlier, frozen
   ones). A media item's tokens x [T, d] of task t become

       x + sum_e g_e * expert_e(x),    g = softmax over the top-k of router_t(mean_T x), zero elsewhere

   (expert: Linear d -> 64, ReLU, Linear 64 -> d zero-initialised, times 0.1, as the reference's adapters).
   The router starts with its own expert's bias at 1 (a new task starts on its own adapter) and zeros
   elsewhere. Rows of a task without an expert (not trained yet) pass through unchanged.

2. The audio-visual gate (the paper's AAVFM), for rows with both media (found in `media_rows` of both) whose task
   has a gate (a task not trained yet has none: its rows keep both media as they are):

       p_v, p_a  = mean over tokens of the adapted video / audio tokens                   [d] each
       r         = Pearson correlation of head_v(p_v) and head_a(p_a)  (the task's shared gate space, [k])
       w         = softmax(router_t([p_v; p_a]))                                          [2]
       fused     : video tokens * 2 w_v, audio tokens * 2 w_a   (w = 1/2 each leaves them as they are)
       alone     : the stronger medium (larger w) unchanged, the other's tokens zeroed
       gate hard : fused if r >= threshold, else alone (the paper)
       gate soft : g * fused + (1 - g) * alone, g = sigmoid(s (r - c)), s and c learned per task
       fuse / <modality>: always fused / always that medium alone (ablations)

   The heads are linear maps d -> k without bias (a bias would let r = 1 for any input), one per medium and
   task, initialised small; they read the pooled tokens detached, and the method trains them to correlate
   a video with its own sound (GATE_SPACE). Without them r compares the coordinates of two projectors of
   unrelated encoders, which have nothing in common (measured r 0.04-0.10 on micl-synth, never fused);
   AudioCLIP's joint space provides a common space in the paper.

Choices where the paper leaves details open are in docs/adaptive_fusion.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# MultimodalOutput.aux keys
POOLED = "fusion_pooled"  # {first, second: [n, d] pooled adapted tokens, "fused": [n, d] pooled gated tokens}
GATE_SPACE = "fusion_gate_space"  # (h_first, h_second [m, k], rows): the pooled media in the gate space
DECISIONS = "fusion_decisions"  # the forward's decisions, detached: rows, tasks, r, weights, share, fuse, stronger

FIXED_GATES = ("hard", "soft", "fuse")


def infonce(x: torch.Tensor, y: torch.Tensor, temperature: float = 0.3) -> torch.Tensor:
    """Symmetric InfoNCE of n paired vectors [n, d] (pair i positive, the other rows negatives; cosine / T).
    log n - infonce is the InfoNCE lower bound on the mutual information of x and y (van den Oord et al. 2018)."""
    x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
    logits = x @ y.T / temperature
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def normalized_infonce_mi(x: torch.Tensor, y: torch.Tensor, temperature: float = 0.3) -> float:
    """The InfoNCE bound on I(x; y) divided by its ceiling log n: in [0, 1] (0 with fewer than two pairs)."""
    n = x.shape[0]
    if n < 2:
        return 0.0
    return max(0.0, float(math.log(n) - infonce(x, y, temperature)) / math.log(n))


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of x and y [n, d] over the last dimension -> [n]."""
    xc = x - x.mean(-1, keepdim=True)
    yc = y - y.mean(-1, keepdim=True)
    return (xc * yc).sum(-1) / torch.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1) + eps)


class BottleneckAdapter(nn.Module):
    """scale * up(relu(down(x))), up zero-initialised: a new expert adds nothing at first."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(F.relu(self.down(x)))


class TaskExperts(nn.Module):
    """The incremental feature extractor: expert e and router e belong to the e-th task added; router e
    scores experts 0..e."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, top_k: int = 2):
        super().__init__()
        self.dim, self.bottleneck, self.scale, self.top_k = dim, bottleneck, scale, top_k
        self.experts = nn.ModuleList()
        self.routers = nn.ModuleList()

    def add(self) -> int:
        index = len(self.experts)
        router = nn.Linear(self.dim, index + 1)
        nn.init.zeros_(router.weight)
        with torch.no_grad():
            router.bias.zero_()
            router.bias[index] = 1.0
        self.experts.append(BottleneckAdapter(self.dim, self.bottleneck, self.scale))
        self.routers.append(router)
        return index

    def gates(self, pooled: torch.Tensor, index: int) -> torch.Tensor:
        """[n, index + 1] weights of experts 0..index: softmax over the router's top-k, zero elsewhere."""
        logits = self.routers[index](pooled).float()
        top, chosen = logits.topk(min(self.top_k, index + 1), dim=-1)
        return torch.zeros_like(logits).scatter(-1, chosen, torch.softmax(top, dim=-1))

    def forward(self, tokens: torch.Tensor, indices: list[int | None]) -> torch.Tensor:
        """tokens [n, T, d] with each item's task index (None: passed through)."""
        result = tokens
        for index in sorted({i for i in indices if i is not None}):
            rows = torch.tensor([r for r, i in enumerate(indices) if i == index], device=tokens.device)
            x = tokens[rows]
            gates = self.gates(x.mean(1), index).to(x.dtype)
            adapted = x + sum(gates[:, e, None, None] * self.experts[e](x) for e in range(index + 1))
            result = result.index_copy(0, rows, adapted)
        return result


class AudioVisualGate(nn.Module):
    """One audio-visual task's fusion router, gate-space heads and (soft gate) centre and sharpness."""

    def __init__(self, dim: int, gate_dim: int, threshold: float, soft: bool):
        super().__init__()
        self.router = nn.Linear(2 * dim, 2)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        # r does not depend on the heads' scale: a small start lets the first updates, not the random
        # initial maps, set the space (with the default init r stays near 0 for tens of steps)
        self.heads = nn.ModuleList([nn.Linear(dim, gate_dim, bias=False) for _ in range(2)])
        for head in self.heads:
            nn.init.normal_(head.weight, std=1e-3)
        if soft:
            self.center = nn.Parameter(torch.tensor(float(threshold)))
            self.log_sharpness = nn.Parameter(torch.tensor(math.log(10.0)))

    def soft_gate(self, r: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.log_sharpness.exp() * (r - self.center))


class AdaptiveFusion(nn.Module):
    def __init__(self, dim: int, threshold: float = 0.8, tasks: list[str] | tuple = (),
                 fusion_tasks: list[str] | tuple = (), modalities: list[str] | tuple = ("video", "audio"),
                 gate: str = "hard", top_k: int = 2, bottleneck: int = 64, adapter_scale: float = 0.1,
                 gate_dim: int = 64, finished_tasks: list[str] | tuple = ()):
        super().__init__()
        if len(modalities) != 2 or modalities[0] == modalities[1]:
            raise ValueError(f"adaptive fusion needs two different modalities, got {modalities!r}")
        if gate not in (*FIXED_GATES, *modalities):
            raise ValueError(f"gate must be one of {', '.join((*FIXED_GATES, *modalities))}, got {gate!r}")
        self.dim, self.threshold, self.modalities, self.gate = dim, float(threshold), tuple(modalities), gate
        self.gate_dim = gate_dim
        self.extractor = TaskExperts(dim, bottleneck, adapter_scale, top_k)
        self.tasks: list[str] = []  # tasks with an expert, in the order they were added
        self.fusion_tasks: list[str] = []  # tasks with an audio-visual gate
        self.gates = nn.ModuleList()
        self.finished_tasks: list[str] = list(finished_tasks)  # tasks whose step ended (the previous model's)
        for task in tasks:
            self.add_task(task)
        for task in fusion_tasks:
            self.add_fusion_task(task)

    def modulator_config(self) -> dict:
        e = self.extractor
        return {"dim": self.dim, "threshold": self.threshold, "tasks": list(self.tasks),
                "fusion_tasks": list(self.fusion_tasks), "modalities": list(self.modalities), "gate": self.gate,
                "top_k": e.top_k, "bottleneck": e.bottleneck, "adapter_scale": e.scale, "gate_dim": self.gate_dim,
                "finished_tasks": list(self.finished_tasks)}

    def finish_task(self, task: str) -> None:
        if task not in self.finished_tasks:
            self.finished_tasks.append(task)

    def previous_model_config(self) -> dict:
        """The settings of this modulator as the model before the current step had it: without the expert,
        router and gate of a task being trained for the first time (they are the last ones added, so the
        other parts keep their places). A teacher (the previous model) is rebuilt from these."""
        config = self.modulator_config()
        config["tasks"] = [t for t in self.tasks if t in self.finished_tasks]
        config["fusion_tasks"] = [t for t in self.fusion_tasks if t in self.finished_tasks]
        return config

    # ---- per-task parts ------------------------------------------------------------------------------------
    def _placed(self, module: nn.Module) -> nn.Module:
        param = next((p for p in self.parameters()), None)
        return module.to(device=param.device, dtype=param.dtype) if param is not None else module

    def add_task(self, task: str) -> None:
        if task not in self.tasks:
            index = self.extractor.add()
            self._placed(self.extractor.experts[index])
            self._placed(self.extractor.routers[index])
            self.tasks.append(task)

    def add_fusion_task(self, task: str) -> None:
        if task not in self.fusion_tasks:
            self.gates.append(self._placed(AudioVisualGate(self.dim, self.gate_dim, self.threshold,
                                                           self.gate == "soft")))
            self.fusion_tasks.append(task)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """What belongs to `task` alone: its expert, its router and its audio-visual gate (if any)."""
        params = []
        if task in self.tasks:
            index = self.tasks.index(task)
            params += [*self.extractor.experts[index].parameters(), *self.extractor.routers[index].parameters()]
        gate = self.gate_of(task)
        if gate is not None:
            params += list(gate.parameters())
        return params

    def gate_of(self, task: str) -> AudioVisualGate | None:
        return self.gates[self.fusion_tasks.index(task)] if task in self.fusion_tasks else None

    def router(self, task: str) -> nn.Linear | None:
        gate = self.gate_of(task)
        return gate.router if gate is not None else None

    # ---- the audio-visual decision ---------------------------------------------------------------------------
    def gate_space(self, pooled_first: torch.Tensor, pooled_second: torch.Tensor, tasks: list[str]):
        """r [n] and (h_first, h_second) [n, k]: each row's pooled media in its task's gate space (every task
        has a gate here, see forward). The heads read the pooled tokens detached: they learn from the method's
        alignment loss and, under the soft gate, from the LM loss through r."""
        h_first, h_second = [], []
        for i, task in enumerate(tasks):
            heads = self.gate_of(task).heads
            h_first.append(heads[0](pooled_first[i].detach()))
            h_second.append(heads[1](pooled_second[i].detach()))
        h_first, h_second = torch.stack(h_first).float(), torch.stack(h_second).float()
        return pearson(h_first, h_second), (h_first, h_second, list(range(len(tasks))))

    def decide(self, pooled_first: torch.Tensor, pooled_second: torch.Tensor, tasks: list[str]) -> dict:
        """For n rows with pooled media [n, d] of both modalities and their task names: r [n], the router
        weights w [n, 2], the share fused g [n] (0 or 1 unless the gate is soft), fuse [n] (g >= 1/2),
        stronger [n] (0 = first modality) and the gate-space vectors ("space", see gate_space)."""
        r, space = self.gate_space(pooled_first, pooled_second, tasks)
        joint = torch.cat([pooled_first, pooled_second], dim=-1)
        logits, shares = [], []
        for i, task in enumerate(tasks):
            gate = self.gate_of(task)
            logits.append(gate.router(joint[i]))
            if self.gate == "soft":
                shares.append(gate.soft_gate(r[i]))
            elif self.gate in ("hard", "soft"):
                shares.append((r[i] >= self.threshold).float().detach())
            else:
                shares.append(r.new_tensor(1.0 if self.gate == "fuse" else 0.0))
        weights = torch.softmax(torch.stack(logits).float(), dim=-1)
        share = torch.stack(shares).float()
        stronger = weights.argmax(-1)
        if self.gate in self.modalities:
            stronger = torch.full_like(stronger, self.modalities.index(self.gate))
        return {"r": r, "weights": weights, "share": share, "fuse": share >= 0.5, "stronger": stronger,
                "space": space}

    @staticmethod
    def scales(decision: dict) -> torch.Tensor:
        """[n, 2] multipliers of the two modalities' tokens: g * 2w + (1 - g) * alone, where alone keeps the
        stronger medium at 1 + w - stop_grad(w) (value 1: the router still learns there) and zeroes the other."""
        w, g = decision["weights"], decision["share"][:, None]
        alone = F.one_hot(decision["stronger"], 2).to(w.dtype) * (1 + w - w.detach())
        return g * 2 * w + (1 - g) * alone

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, projected: dict[str, torch.Tensor], media_rows=None, media_tasks=None,
                aux: dict | None = None) -> dict:
        """The adapted and gated tokens; into `aux` go the decisions (DECISIONS, detached), and for the method's
        losses the pooled media of the rows with both (POOLED) and their gate-space vectors (GATE_SPACE)."""
        aux = {} if aux is None else aux
        if media_rows is None or media_tasks is None:
            return projected
        result = dict(projected)
        for modality, tokens in projected.items():
            rows = media_rows[modality].tolist()
            indices = [self.tasks.index(media_tasks[row]) if media_tasks[row] in self.tasks else None
                       for row in rows]
            if any(i is not None for i in indices):
                result[modality] = self.extractor(tokens, indices)
        first, second = self.modalities
        if first not in result or second not in result:
            return result
        # rows with both media whose task has a gate; the others (a task not trained yet) keep both as they are
        position = {row: j for j, row in enumerate(media_rows[second].tolist())}
        pairs = [(i, position[row], row) for i, row in enumerate(media_rows[first].tolist())
                 if row in position and media_tasks[row] in self.fusion_tasks]
        if not pairs:
            return result
        x, y = result[first], result[second]
        index_x = torch.tensor([i for i, _, _ in pairs], device=x.device)
        index_y = torch.tensor([j for _, j, _ in pairs], device=y.device)
        tasks = [media_tasks[row] for _, _, row in pairs]
        pooled_x, pooled_y = x[index_x].mean(1), y[index_y].mean(1)
        decision = self.decide(pooled_x, pooled_y, tasks)
        scale = self.scales(decision)
        x_scaled, y_scaled = x[index_x] * scale[:, 0, None, None].to(x.dtype), y[index_y] * scale[:, 1, None, None].to(y.dtype)
        aux[POOLED] = {first: pooled_x, second: pooled_y, "fused": torch.cat([x_scaled, y_scaled], 1).mean(1)}
        aux[GATE_SPACE] = decision["space"]
        aux[DECISIONS] = {"rows": [row for _, _, row in pairs], "tasks": tasks,
                          **{k: v.detach() for k, v in decision.items() if k != "space"}}
        result[first] = x.index_copy(0, index_x, x_scaled)
        result[second] = y.index_copy(0, index_y, y_scaled)
        return result
