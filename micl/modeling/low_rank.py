"""Low-rank updates folded into a module's frozen weights, replayable bit for bit.

A tuner that merges its adapter into the base weights after a phase (Harmony's "parameter-level
accumulation", micl/adapters/gated_lora) changes weights that a phase folder does not otherwise store (the
frozen LLM is never written). It hands its factors to `MultimodalLM.merge_low_rank`, which applies them with
`low_rank_delta` and records them; a phase folder then keeps every merged update
(`base_updates.safetensors`, rank r per module and phase, instead of full weight matrices), and loading the
phase replays them in order onto the freshly loaded base weights: the same float operations in the same
order give the same weights, bit for bit, on the same hardware.

An update is {weight parameter name: (up [out, r], down [r, in], scale [1])}, delta = (up @ down) * scale
computed in float32 and added to the weight in its own dtype.
"""

from __future__ import annotations

import torch

UPDATES_FORMAT = "micl-low-rank-updates-v1"


def low_rank_delta(up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(up @ down) * scale in float32 (the one formula used both to merge and to replay)."""
    return (up.float() @ down.float()) * scale.float()


@torch.no_grad()
def apply_low_rank_update(module: torch.nn.Module, update: dict) -> None:
    """Adds every delta of `update` to the named parameter of `module`, in place."""
    params = dict(module.named_parameters())
    unknown = [name for name in update if name not in params]
    if unknown:
        raise KeyError(f"low-rank update for unknown parameters {unknown[:3]}")
    for name, (up, down, scale) in update.items():
        weight = params[name]
        delta = low_rank_delta(up.to(weight.device), down.to(weight.device), scale.to(weight.device))
        if delta.shape != weight.shape:
            raise ValueError(f"low-rank update for {name}: delta {tuple(delta.shape)} vs weight {tuple(weight.shape)}")
        weight.data.add_(delta.to(weight.dtype))


def updates_to_tensors(updates: list[dict]) -> dict[str, torch.Tensor]:
    """Flat safetensors dict: "<index>:<param name>:up|down|scale"."""
    flat = {}
    for index, update in enumerate(updates):
        for name, (up, down, scale) in update.items():
            for part, value in (("up", up), ("down", down), ("scale", scale)):
                flat[f"{index}:{name}:{part}"] = value.detach().contiguous().cpu()
    return flat


def updates_from_tensors(flat: dict[str, torch.Tensor]) -> list[dict]:
    by_index: dict[int, dict] = {}
    for key, value in flat.items():
        index, name, part = key.split(":")
        by_index.setdefault(int(index), {}).setdefault(name, {})[part] = value
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"low-rank updates file: indices {sorted(by_index)} are not 0..{len(by_index) - 1}")
    return [{name: (p["up"], p["down"], p["scale"]) for name, p in by_index[i].items()} for i in range(len(by_index))]


def same_update(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a[name], b[name])) for name in a)
