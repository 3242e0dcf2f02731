"""Every loss normalised by its items in the whole global batch (all processes, all accumulation steps).

A mean over each micro-batch's own target tokens makes 2 processes x batch 4 average two means where
1 process x batch 8 takes one, and gradient accumulation over-weight short targets. Instead the trainer
counts, before the first forward of an optimizer step, the items of every kind in all of the step's
micro-batches (main targets, and the kinds the methods declare), sums the counts over the processes
(one all-reduce of a small vector, kept on the device), and divides each summed loss by its total.
Processes average their gradients, so each process's share is multiplied by the number of processes.
The result equals, up to float rounding, the single-process loss on the same global batch.
"""

from __future__ import annotations

import torch

from ..methods.base import TokenSum
from ..modeling.prompting import target_tokens

MAIN_ITEMS = "labels"


def item_kinds(methods) -> list[str]:
    kinds = [MAIN_ITEMS]
    for method in methods:
        kinds.extend(k for k in method.loss_items if k not in kinds)
    return kinds


def local_counts(batches: list[dict], methods, kinds: list[str], device) -> torch.Tensor:
    """[len(kinds)] items of each kind in these micro-batches (int64 on `device`, not read back). Counts of
    tensors already on the device stay there; those of the hooks' batches (still on the host) are summed
    on the host and moved in one copy."""
    device = torch.device(device)
    on_device = torch.zeros(len(kinds), dtype=torch.long, device=device)
    on_host = torch.zeros(len(kinds), dtype=torch.long)
    for batch in batches:
        counts = [(MAIN_ITEMS, target_tokens(batch["labels"]))]
        for method in methods:
            counts.extend(method.count_loss_items(batch).items())
        for kind, count in counts:  # a method's "labels" add to the batch's: rows it adds to the cross-entropy
            i = kinds.index(kind)
            if isinstance(count, torch.Tensor) and count.device.type != "cpu":
                on_device[i] += count.to(on_device.device).long()
            else:
                on_host[i] += count
    return on_device + on_host.to(device, non_blocking=True) if device.type != "cpu" else on_device + on_host


class GlobalBatchScale:
    """Turns the losses of one micro-batch into its share of the global batch's loss."""

    def __init__(self, kinds: list[str], totals: torch.Tensor, num_processes: int, micro_batches: int):
        self.totals = {kind: totals[i] for i, kind in enumerate(kinds)}
        self.num_processes = num_processes
        self.micro_batches = micro_batches

    @classmethod
    def of_window(cls, batches: list[dict], methods, device, num_processes: int) -> "GlobalBatchScale":
        kinds = item_kinds(methods)
        totals = local_counts(batches, methods, kinds, device)
        if num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        return cls(kinds, totals, num_processes, len(batches))

    def resolve(self, loss) -> torch.Tensor:
        """TokenSum -> its share; a list of them -> the sum of their shares (one graph, one backward);
        a plain tensor (a per-batch regulariser) -> averaged over the step's micro-batches."""
        if isinstance(loss, (list, tuple)):
            return sum(self.resolve(part) for part in loss)
        if isinstance(loss, TokenSum):
            if loss.items not in self.totals:
                raise KeyError(f"loss items {loss.items!r} are not counted; declare them in the method's loss_items")
            total = self.totals[loss.items].clamp(min=1).to(loss.value.dtype if loss.value.is_floating_point()
                                                            else torch.float32)
            return loss.value * self.num_processes / total
        return loss / self.micro_batches
