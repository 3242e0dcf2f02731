"""What micl needs to run under `accelerate launch` / `torchrun` (DDP, DeepSpeed ZeRO-1/2/3), and nothing
more: the Trainer and Accelerate do the distributed training itself.

- `init_distributed()` sets up the process group before the first `TrainingArguments` is built. On CPU it
  forces the gloo backend: without it Accelerate silently runs every process as its own world of one
  (no data sharding) under DeepSpeed, and reports distributed type NO for DDP launches without `use_cpu`.
- `training_arguments_kwargs()` is what `TrainingArguments` needs on top of the recipe's settings: the
  already configured state, the DeepSpeed JSON of an `accelerate launch --config_file <deepspeed config>`,
  `use_cpu` + gloo for CPU DDP.
- `is_main_process()`, `barrier()`, `main_process_first()`: work done once (files written by the main
  process) with the other ranks waiting; `local_rank()`, `local_world_size()`, `launch_device()`: work
  shared by the processes of one machine (the feature store's encoding, micl/modeling/feature_store.py).
- `gathered(params)`: DeepSpeed ZeRO-3 partitions every parameter (a rank holds a flat shard; the
  parameter itself has shape 0 outside a forward). Reading or changing one outside a forward is a
  collective: every rank must enter the same `gathered(...)`. Without ZeRO-3 it does nothing.

A single process (no launcher) takes none of these paths: nothing changes there.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager, nullcontext

import torch


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launched_distributed() -> bool:
    """True under `accelerate launch` / `torchrun` with more than one process, or with a DeepSpeed config."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or deepspeed_requested()


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED (torchrun users set it)."""
    return _env_flag("ACCELERATE_USE_DEEPSPEED") and "LOCAL_RANK" in os.environ


def deepspeed_config_file() -> str | None:
    """The DeepSpeed JSON named by the accelerate config (`deepspeed_config.deepspeed_config_file`)."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    return path or None


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def use_cpu() -> bool:
    return _env_flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


DEFAULT_TIMEOUT_S = 1800


def init_distributed(timeout_s: float | None = None):
    """Creates Accelerate's PartialState (and the process group, with collectives timing out after
    `timeout_s`, the recipe's `train.ddp_timeout`) once per process; None for a single process.
    Idempotent: `micl compare` trains several recipes in one process."""
    if not launched_distributed():
        return None
    from datetime import timedelta

    from accelerate import PartialState

    if PartialState._shared_state:  # already set up (an earlier recipe of this process)
        return PartialState()
    timeout = timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    if deepspeed_requested():
        # DeepSpeed picks its own backend name from the accelerator; on CPU Accelerate would then see no
        # backend and run each process as a world of one. Forcing gloo keeps the world.
        return PartialState(backend="gloo", timeout=timeout) if use_cpu() else PartialState(timeout=timeout)
    if use_cpu():
        return PartialState(cpu=True, backend="gloo", timeout=timeout)
    return PartialState(timeout=timeout)


def launch_device() -> torch.device:
    """The device this process computes on: the launcher's (one GPU per process), else the first GPU /
    MPS, else the CPU. The model is placed there as soon as it is built, so that the evaluations before
    the first Trainer exists run on it too."""
    state = _state()
    if state is not None:
        return state.device
    if _env_flag("ACCELERATE_USE_CPU"):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def rank() -> int:
    state = _state()
    return 0 if state is None else state.process_index


def map_sharded(fn, jobs: list, uniform: bool = False) -> list:
    """`[fn(job) for job in jobs]`, with the jobs shared by the processes of a launch: rank r runs jobs r,
    r + N, ... and every rank gets all results, in job order (one all_gather_object). `uniform`: every rank
    calls `fn` equally often (under ZeRO-3 each forward is a collective), repeating a job and dropping its
    result where it has fewer. In a single process: a plain loop."""
    processes = world_size()
    if processes == 1:
        return [fn(job) for job in jobs]
    mine = list(range(rank(), len(jobs), processes))
    calls = math.ceil(len(jobs) / processes) if uniform else len(mine)
    results = {}
    for call in range(calls):
        index = mine[call] if call < len(mine) else (mine[-1] if mine else 0)
        if not jobs:
            break
        output = fn(jobs[index])
        if call < len(mine):
            results[index] = output
    everyone: list = [None] * processes
    torch.distributed.all_gather_object(everyone, results)
    merged = {k: v for part in everyone for k, v in part.items()}
    return [merged[i] for i in range(len(jobs))]


# DeepSpeed settings that the Trainer derives from `model.config.hidden_size` when they are "auto";
# MultimodalLM is not a PreTrainedModel (no `config`), so micl fills them from the LLM's hidden size.
_HIDDEN_SIZE_KEYS = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def _read_deepspeed_json(path: str) -> dict:
    import json

    from ..errors import ConfigError

    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config ({err}); paths in accelerate configs are "
                          f"relative to the directory the command runs in") from err


def load_deepspeed_config(path: str, hidden_size: int | None) -> dict:
    from ..errors import ConfigError

    config = _read_deepspeed_json(path)
    zero = config.get("zero_optimization", {})
    for key, value in _HIDDEN_SIZE_KEYS.items():
        if zero.get(key) == "auto":
            if hidden_size is None:
                raise ConfigError(f"{path}: zero_optimization.{key} is 'auto' but the model's hidden size is unknown")
            zero[key] = value(hidden_size)
    return config


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage of the DeepSpeed launch (None without DeepSpeed)."""
    if not deepspeed_requested():
        return None
    path = deepspeed_config_file()
    if path is None:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return int(stage) if stage and stage.isdigit() else None
    return int(_read_deepspeed_json(path).get("zero_optimization", {}).get("stage", 0))


def training_arguments_kwargs(hidden_size: int | None = None) -> dict:
    """Extra `TrainingArguments` settings for a distributed launch (for a single process: only `use_cpu`
    on a machine without an accelerator)."""
    state = init_distributed()
    if state is None:
        # one process: without a GPU, TrainingArguments refuses bf16 unless told it runs on the CPU
        return {"use_cpu": True} if not torch.cuda.is_available() and not _mps_available() else {}
    from accelerate.state import AcceleratorState

    # Each step builds a new Trainer (new scheduler length, new dataset); the Accelerator of the last one
    # must not leak its DeepSpeed plugin into the next. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    kwargs: dict = {"accelerator_config": {"use_configured_state": True}}
    if deepspeed_requested():
        config = deepspeed_config_file()
        if config is None:
            from ..errors import ConfigError

            raise ConfigError("DeepSpeed launch without a DeepSpeed JSON: set deepspeed_config_file in the "
                              "accelerate config (see recipes/accelerate/zero3.yaml and docs/distributed.md)")
        kwargs["deepspeed"] = load_deepspeed_config(config, hidden_size)
    elif use_cpu():
        kwargs["ddp_backend"] = "gloo"
    if use_cpu():
        kwargs["use_cpu"] = True  # (also what lets TrainingArguments accept bf16 without a GPU)
    return kwargs


def _state():
    from accelerate import PartialState

    return PartialState() if PartialState._shared_state else None


def is_main_process(local: bool = False) -> bool:
    """The process that writes the run folder (rank 0); with `local`, the first process of this machine
    (which prepares machine-local files: the synthetic data, the feature and model caches)."""
    state = _state()
    if state is None:
        return True
    return state.is_local_main_process if local else state.is_main_process


def world_size() -> int:
    state = _state()
    return 1 if state is None else state.num_processes


def local_rank() -> int:
    """This process's position among the processes of its machine (0 in a single process)."""
    state = _state()
    return 0 if state is None else state.local_process_index


def local_world_size() -> int:
    """How many processes of the launch run on this machine (1 in a single process)."""
    if _state() is None:
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def all_processes_agree(flag: bool) -> bool:
    """True when `flag` is true on every process (a collective; the flag itself in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    backend = torch.distributed.get_backend()
    device = launch_device() if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


_first_depth = 0


@contextmanager
def main_process_first(local: bool = True):
    """The (local) main process runs the block first (e.g. writes a cache), then the others (which read
    it). Nested blocks run inside the outer one's order."""
    global _first_depth
    outer = _first_depth == 0
    first = is_main_process(local)
    if outer and not first:
        barrier()
    _first_depth += 1
    try:
        yield
    finally:
        _first_depth -= 1
        if outer and first:
            barrier()


@contextmanager
def plain_model_loading():
    """Models loaded inside the block are built whole, even while a ZeRO-3 Trainer exists.

    The Trainer registers its DeepSpeed config globally, and transformers' `from_pretrained` then builds
    every model partitioned (`deepspeed.zero.Init`). micl loads frozen encoders lazily, on the first feature
    store that is missing (each process of a machine encodes its share of it): a partitioned encoder would
    wait in its first forward for ranks that have nothing to encode or wait at a barrier (seen here: a hang
    at the first audio task after a ZeRO-3 step). The LLM is partitioned by the DeepSpeed engine when training starts."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def is_partitioned(param: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (its data lives in shards across the ranks)."""
    return hasattr(param, "ds_id")


def gathered(params, modifier_rank: int | None = None):
    """Full ZeRO-3 parameters inside the block (collective: every rank enters it with the same list);
    `modifier_rank` = the rank whose in-place changes are kept (broadcast and re-partitioned on exit).
    A no-op when none of `params` is partitioned."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def has_master_copy(param: torch.Tensor) -> bool:
    """A trained parameter whose fp32 master copy DeepSpeed keeps in its optimizer (ZeRO-1/2/3). The
    attributes exist on every rank (ZeRO-1/2's mapping is None on ranks without a fragment of it)."""
    return hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping")


def trained_value(param: torch.Tensor) -> torch.Tensor:
    """The full fp32 value of a trained parameter: DeepSpeed's master copy when it keeps one (a collective:
    every rank calls it; under ZeRO-3 inside `gathered([param])`), else the parameter itself."""
    if has_master_copy(param) and param.requires_grad:
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        if value is not None:
            return value.reshape(param.shape).float()
    return param.detach().float()


def set_trained_value(param: torch.Tensor, value: torch.Tensor) -> None:
    """Sets a trained parameter in place during training, DeepSpeed's fp32 master copy included.

    ZeRO-1/2/3 keep an fp32 copy of every trained parameter inside the optimizer and overwrite the model's
    parameter from it at the next step, so changing only `param` would be undone. Under ZeRO-3 call this
    inside `gathered([param], modifier_rank=0)` with the same full `value` on every rank."""
    param.data.copy_(value.to(param.dtype))
    if has_master_copy(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())
