"""Distributed benchmark (CPU): memory per process under DeepSpeed ZeRO-3 and training throughput, one
process vs two. Prints a table and writes JSON.

  memory       bytes of the parameters and of the optimizer state that each process holds after a few
               training steps, counted over distinct tensor storages (a view into a flat buffer counts
               once): under ZeRO-3 the weight shards (`ds_tensor`), the weights DeepSpeed keeps whole
               (below `stage3_param_persistence_threshold`), the fp32 master shards of the trained
               weights and AdamW's two moments of them; in one process the weights and AdamW's moments.
  throughput   training samples/s and tokens/s over the optimizer steps after the first (steady state),
               same global batch, every process with the same number of threads (`--threads`, default
               1): two processes use twice the cores of one, so 2.0x is ideal scaling. On a machine whose
               cores are busy with other work the two-process numbers are bounded by what is left.

    python scripts/bench_distributed.py [--model default|tiny] [--steps 6] [--batch 8] [--threads 1]
        [--configs zero3 ddp] [--out bench_results_distributed.json]

`default` is the embedded default (SmolLM2-135M-Instruct + LoRA r=8 q/v + image projector), `tiny` a
2-layer Llama built from a config (seconds). Each measurement is a subprocess (`accelerate launch` with
recipes/accelerate/<config>.yaml for two processes); run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---- worker (one process of a measurement) -----------------------------------------------------------
def storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        if not torch.is_tensor(tensor) or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate / DeepSpeed wrappers
    inner = getattr(inner, "optimizer", inner)
    tensors = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t)]
    return tensors


def measure_memory(trainer, model) -> dict:
    params = list(model.parameters())
    zero3 = [p for p in params if hasattr(p, "ds_id")]
    if zero3:
        weights = [p.ds_tensor for p in zero3] + [p.data for p in zero3 if getattr(p, "ds_persist", False)]
        engine_optimizer = trainer.model_wrapped.optimizer  # DeepSpeedZeroOptimizer_Stage3
        master = list(engine_optimizer.fp32_partitioned_groups_flat)
        moments = optimizer_state_tensors(engine_optimizer)
    else:
        weights = [p.data for p in params]
        engine_optimizer = trainer.optimizer
        master = []
        # ZeRO-1/2 keep fp32 master partitions too
        inner = getattr(trainer.model_wrapped, "optimizer", None)
        if inner is not None and hasattr(inner, "single_partition_of_fp32_groups"):
            master = list(inner.single_partition_of_fp32_groups)
            engine_optimizer = inner
        moments = optimizer_state_tensors(engine_optimizer)
    trained = [p for p in params if p.requires_grad]
    return {
        "weights_bytes": storage_bytes(weights),
        "master_bytes": storage_bytes(master),
        "moments_bytes": storage_bytes(moments),
        "params_total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "params_trained": sum(getattr(p, "ds_numel", p.numel()) for p in trained),
        "zero3_params": len(zero3),
        "persistent_params": sum(1 for p in zero3 if getattr(p, "ds_persist", False)),
    }


def worker(args) -> int:
    from transformers import TrainerCallback

    from micl.config import load_recipe
    from micl.methods import StepContext
    from micl.data.collator import MultimodalCollator
    from micl.training.loop import ContinualRun
    from micl.utils.distributed import init_distributed, is_main_process, main_process_first, world_size

    torch.set_num_threads(args.threads)
    init_distributed()
    samples = args.batch * world_size() * args.steps  # args.batch is per process here
    overrides = [f"output_dir={args.out_dir}", "order=[synth_image_caption]", "train.epochs=1",
                 f"train.batch_size={args.batch}", f"data.max_train_samples={samples}",
                 "train.save_steps=100000", "train.logging_steps=1", "train.tensorboard=false",
                 "lora.dropout=0.0", "eval.forward_transfer=false", *args.overrides]
    config = load_recipe(str(REPO / "recipes" / "quick.yaml"), overrides)
    run = ContinualRun(config)
    with main_process_first():
        run.data.ensure_synthetic(run.tasks)
    task = run.tasks[0]
    dataset = run.dataset(task, "train")
    tokens_per_sample = sum(len(dataset[i]["input_ids"]) for i in range(len(dataset))) / len(dataset)

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    ctx = StepContext(step=0, task=task, seen_tasks=[], model=run.model, train_dataset=dataset,
                      run_dir=str(run.out), seed=config.seed, batch_size=config.train.batch_size,
                      dataset_fn=run.dataset, collate_fn=MultimodalCollator(run.model.tokenizer.pad_token_id))
    from micl.training.trainer import MiclTrainer

    trainer = MiclTrainer(model=run.model, args=run._training_args(0, dataset), train_dataset=dataset,
                          data_collator=ctx.collate_fn, methods=[], ctx=ctx, callbacks=[Clock()],
                          projector_lr=config.train.projector_lr)
    started = time.perf_counter()
    trainer.train()
    memory = measure_memory(trainer, run.model)
    steady = times[-1] - times[0]
    steps = len(times) - 1
    global_batch = config.train.batch_size * world_size()
    result = {
        "world_size": world_size(),
        "distributed_type": trainer.accelerator.distributed_type.value,
        "threads": torch.get_num_threads(),
        "per_device_batch": config.train.batch_size,
        "global_batch": global_batch,
        "steps_timed": steps,
        "samples_per_s": global_batch * steps / steady,
        "tokens_per_s": global_batch * steps * tokens_per_sample / steady,
        "train_wall_s": time.perf_counter() - started,
        **memory,
    }
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.report}.rank{rank}.json").write_text(json.dumps(result, indent=1))
    if is_main_process():
        print(json.dumps(result))
    return 0


# ---- driver -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_overrides(root: Path) -> list[str]:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_models
    from micl.modeling.llm import embedded_llm_dir

    models = build_tiny_models(root, embedded_llm_dir("smollm2-135m-instruct"))
    return [f"model.llm={models['llm']}", f"model.image_encoder={models['vit']}", "model.image_tokens=4",
            f"model.audio_encoder={models['whisper']}", "model.audio_tokens=4"]


def measure(name: str, config: str | None, processes: int, threads: int, args, extra: list[str], tmp: Path) -> list[dict]:
    report = tmp / name
    worker_args = ["--worker", "--report", str(report), "--out-dir", str(tmp / f"run_{name}"),
                   "--threads", str(threads), "--batch", str(args.batch // processes), "--steps", str(args.steps),
                   "--", *extra]
    script = str(Path(__file__).resolve())
    if config is None:
        cmd = [sys.executable, script, *worker_args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / f"{config}.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(_free_port()), script, *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    print(f"[bench_distributed] {name}: {' '.join(cmd[:8])} ...", flush=True)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(processes)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps (the first is not timed)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (split across the processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    parser.add_argument("--configs", nargs="*", default=["zero3", "ddp"], help="recipes/accelerate/<name>.yaml")
    parser.add_argument("--out", default="bench_results_distributed.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="micl_bench_dist_") as folder:
        tmp = Path(folder)
        extra = tiny_overrides(tmp / "models") if args.model == "tiny" else []
        single = measure("single", None, 1, args.threads, args, extra, tmp)[0]
        runs = {"single": [single]}
        for config in args.configs:
            runs[config] = measure(config, config, 2, args.threads, args, extra, tmp)

    def held(r: dict) -> int:
        return r["weights_bytes"] + r["master_bytes"] + r["moments_bytes"]

    rows = []
    for name, ranks in runs.items():
        first = ranks[0]
        rows.append({
            "run": name, "processes": len(ranks), "distributed_type": first["distributed_type"],
            "threads_per_process": first["threads"], "global_batch": first["global_batch"],
            "samples_per_s": first["samples_per_s"], "tokens_per_s": first["tokens_per_s"],
            "throughput_vs_single": first["samples_per_s"] / single["samples_per_s"],
            "max_bytes_per_process": max(held(r) for r in ranks),
            "memory_vs_single": max(held(r) for r in ranks) / held(single),
            "per_rank": ranks,
        })
    print(f"\nmodel: {args.model}, {single['params_total'] / 1e6:.1f}M parameters "
          f"({single['params_trained'] / 1e6:.2f}M trained), global batch {args.batch}, {args.steps} steps, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'run':8} {'procs':>5} {'type':>10} {'thr':>3} {'samples/s':>9} {'tokens/s':>8} {'x single':>8} "
          f"{'weights MB':>10} {'master MB':>9} {'moments MB':>10} {'mem/proc vs single':>18}")
    for row in rows:
        worst = max(row["per_rank"], key=held)
        print(f"{row['run']:8} {row['processes']:>5} {row['distributed_type']:>10} {row['threads_per_process']:>3} "
              f"{row['samples_per_s']:>9.2f} {row['tokens_per_s']:>8.1f} {row['throughput_vs_single']:>8.2f} "
              f"{worst['weights_bytes'] / 2**20:>10.1f} {worst['master_bytes'] / 2**20:>9.2f} "
              f"{worst['moments_bytes'] / 2**20:>10.2f} {row['memory_vs_single']:>18.3f}")
    results = {"model": args.model, "steps": args.steps, "global_batch": args.batch, "threads": args.threads,
               "torch": torch.__version__, "rows": rows, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
