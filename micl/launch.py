"""`micl train` starting its own processes: the recipe's `launch` section (e.g. `launch: {config: zero2}`)
becomes `accelerate launch --config_file <config> --num_processes N -m micl train <recipe> <overrides>`.

The built-in configs are recipes/accelerate/<name>.yaml (micl/utils/resources.py). Their DeepSpeed JSONs
are named by paths relative to the repository root; the launcher gets a copy of the config with that path
made absolute, so a launch works from any directory. Under a launcher already (`accelerate launch`,
`torchrun`, or the processes started here) the section is ignored: nothing is started twice. Before it starts
them, the recipe passes the preflight (micl/preflight.py) with the ZeRO stage of the config (`zero_stage`).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from .errors import ConfigError
from .utils.io import read_yaml_mapping
from .utils.resources import find_resource, resource_names

ACCELERATE_DIR = "recipes/accelerate"
#: set in the processes started here (Accelerate's one-process launcher sets no WORLD_SIZE)
LAUNCHED_ENV = "MICL_LAUNCHED"


def builtin_configs() -> list[str]:
    return resource_names(ACCELERATE_DIR, ".yaml")


def already_launched() -> bool:
    """Running under a launcher: one of its processes, not the command a user typed."""
    return any(key in os.environ for key in (LAUNCHED_ENV, "WORLD_SIZE", "LOCAL_RANK"))


def launch_requested(config) -> bool:
    return config.launch.config is not None and not already_launched()


def config_path(name: str, source: str) -> Path:
    """A built-in config name (`zero2`) or the path of an accelerate config file."""
    if name in builtin_configs():
        return find_resource(f"{ACCELERATE_DIR}/{name}.yaml")
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    raise ConfigError(f"{source}: 'launch.config' must be one of {', '.join(builtin_configs())} "
                      f"(recipes/accelerate/) or an accelerate config file, got {name!r}")


def _deepspeed_json(relative: str, config_file: Path) -> Path:
    """A relative JSON path as `accelerate launch` reads it (from the current directory), else next to the
    accelerate config, else the repository's / package's copy (`recipes/deepspeed/zero2.json`)."""
    for candidate in (Path.cwd() / relative, config_file.parent / relative):
        if candidate.is_file():
            return candidate.resolve()
    try:
        return find_resource(relative)
    except ConfigError:
        raise ConfigError(f"{config_file}: deepspeed_config.deepspeed_config_file {relative!r} not found (looked in "
                          f"{Path.cwd()}, {config_file.parent} and micl's recipes/)") from None


def resolved_config(name: str, source: str) -> tuple[Path, dict, bool]:
    """The accelerate config file, its settings with the DeepSpeed JSON path made absolute, and whether
    that changed them."""
    path = config_path(name, source)
    settings = read_yaml_mapping(path, "an accelerate config: a mapping of its settings")
    if int(settings.get("num_machines", 1) or 1) > 1:
        raise ConfigError(f"{source}: 'launch.config' {name!r} is a multi-machine config ({path}); `launch` starts "
                          f"the processes of one machine: run `accelerate launch --config_file {path} -m micl train "
                          f"...` on every machine (docs/distributed.md)")
    deepspeed = settings.get("deepspeed_config") or {}
    relative = deepspeed.get("deepspeed_config_file")
    rewrite = bool(relative) and not Path(relative).is_absolute()
    if rewrite:
        settings["deepspeed_config"] = {**deepspeed, "deepspeed_config_file": str(_deepspeed_json(relative, path))}
    return path, settings, rewrite


def zero_stage(settings: dict) -> int | None:
    """The DeepSpeed ZeRO stage of a resolved accelerate config (None without DeepSpeed): its JSON's
    zero_optimization.stage, else the config's own zero_stage."""
    if str(settings.get("distributed_type", "")).upper() != "DEEPSPEED":
        return None
    deepspeed = settings.get("deepspeed_config") or {}
    path = deepspeed.get("deepspeed_config_file")
    if path:
        try:
            stage = json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: cannot read the DeepSpeed config ({err})") from None
        return int(stage)
    stage = deepspeed.get("zero_stage")
    return int(stage) if stage is not None else None


def process_count(launch, settings: dict) -> int:
    """`launch.num_processes`; null: one per visible GPU, without GPUs the accelerate config's count."""
    if launch.num_processes is not None:
        return launch.num_processes
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count()
    return int(settings.get("num_processes", 1) or 1)


def launch_command(config_file: str, processes: int, port: int | None, micl_args: list[str]) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", config_file,
               "--num_processes", str(processes)]
    if port is not None:
        command += ["--main_process_port", str(port)]
    return [*command, "-m", "micl", *micl_args]


def run_launch(config, source: str, micl_args: list[str]) -> int:
    """Checks the recipe for the launch (micl/preflight.py, with the config's ZeRO stage), starts the processes
    (own process group; SIGINT/SIGTERM are passed on to all of them) and returns the launcher's exit code
    (128 + N when it was killed by signal N)."""
    from .preflight import preflight

    launch = config.launch
    path, settings, rewritten = resolved_config(launch.config, source)
    preflight(config, source, zero_stage=zero_stage(settings))
    processes = process_count(launch, settings)
    written = None
    if rewritten:
        with tempfile.NamedTemporaryFile("w", prefix="micl-accelerate-", suffix=".yaml", delete=False) as handle:
            yaml.safe_dump(settings, handle, sort_keys=False)
        written = handle.name
    command = launch_command(written or str(path), processes, launch.main_process_port, micl_args)
    print(f"[micl] launching {processes} processes ({launch.config}): {shlex.join(command)}", flush=True)
    process = subprocess.Popen(command, env={**os.environ, LAUNCHED_ENV: "1"}, start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if written:
            os.unlink(written)
    return code if code >= 0 else 128 - code
