"""One process of a distributed test run (tests/test_distributed.py), launched by `accelerate launch` or
`torchrun` (or run plainly for the single-process reference):

    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 2 \
        tests/distributed_worker.py REPORT_PREFIX RECIPE key=value ...

Runs `micl train` (ContinualRun) with probe hooks around the recipe's methods and writes
REPORT_PREFIX.rank<k>.json: world size and distributed type as the Trainer's Accelerator sees them, the
sample ids of every batch, the logged losses, the ZeRO-3 partitioning, and for MoInCL what the teacher
and the interpolation did. The main process also keeps each step's last within-step checkpoint
(`trainable.safetensors`) in `<output_dir>/kept_checkpoints/` (the loop deletes them once a step is saved).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from micl.config import load_recipe
from micl.methods import ContinualMethod
from micl.training.loop import ContinualRun
from micl.methods.moincl import per_step
from micl.training.trainer import model_inputs
from micl.utils.distributed import gathered, has_master_copy, is_main_process


def _accelerator_info(model) -> dict:
    from accelerate.state import AcceleratorState

    state = AcceleratorState()
    plugin = state.deepspeed_plugin if state.distributed_type.value == "DEEPSPEED" else None
    params = list(model.parameters())
    zero = [p for p in params if hasattr(p, "ds_id")]
    return {
        "world_size": state.num_processes,
        "process_index": state.process_index,
        "distributed_type": state.distributed_type.value,
        "backend": state.backend,
        "torch_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "zero3_params": len(zero),
        "params": len(params),
        # a ZeRO-3 parameter outside a forward holds no data; its shard is ds_tensor
        "empty_params": sum(1 for p in zero if p.numel() == 0),
        "local_shard_numel": sum(p.ds_tensor.numel() for p in zero),
        "full_numel": sum(p.ds_numel for p in zero) if zero else sum(p.numel() for p in params),
    }


class Probe(ContinualMethod):
    """Placed after the recipe's methods: sees the batches as the model gets them."""

    name = "probe"

    def __init__(self, run: ContinualRun, report: dict):
        super().__init__()
        self.run = run
        self.report = report

    def _step(self, ctx) -> dict:
        return self.report["steps"].setdefault(str(ctx.step), {"batches": [], "epoch_end": []})

    def on_task_start(self, ctx):
        keep = os.environ.get("MICL_TEST_PSEUDO_KEEP")
        moincl = next((m for m in self.run.methods if m.name == "moincl"), None)
        if keep is not None and moincl is not None and moincl.pseudo:
            # one sample (the first that has one) keeps its pseudo target: the rank whose batch holds it runs
            # more auxiliary rows than the other
            first = next(i for i, p in enumerate(moincl.pseudo) if p is not None)
            moincl.pseudo = [p if i == first else None for i, p in enumerate(moincl.pseudo)]
        # the trainable weights the step starts from (full tensors, gathered under ZeRO-3)
        model = ctx.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        with gathered(trainable):
            state = {k: v.detach().contiguous().cpu().float() for k, v in model.trainable_state_dict().items()}
        if is_main_process():
            keep_dir = Path(self.run.out) / "kept_checkpoints" / f"step_{ctx.step}"
            keep_dir.mkdir(parents=True, exist_ok=True)
            save_file(state, str(keep_dir / "init.safetensors"))

    def augment_batch(self, batch, ctx):
        record = self._step(ctx)
        crash_after = int(os.environ.get("MICL_TEST_CRASH_AFTER", "0"))
        if crash_after and ctx.step == 0 and len(record["batches"]) >= crash_after:
            raise SystemExit(17)  # every rank at the same point: a killed run, to be resumed
        if "info" not in record:
            record["info"] = _accelerator_info(ctx.model)
            record["label_counts"] = []
        record["batches"].append([int(i) for i in batch["sample_index"]])
        record["label_counts"].append([int(n) for n in (batch["labels"] != -100).sum(-1)])
        record.setdefault("extra_inputs", []).append(sorted(k for k in ("moincl", "replay") if k in batch))
        extra = batch.get("moincl") or {}
        pseudo, instructions = extra.get("pseudo"), extra.get("instructions")
        record.setdefault("pseudo_rows", []).append(
            0 if pseudo is None else int((pseudo["labels"] != -100).any(-1).sum()))
        record.setdefault("instruction_rows", []).append(0 if instructions is None else len(instructions["input_ids"]))
        return batch

    def on_task_end(self, ctx):
        # logits of the task's first evaluation batch with the weights the phase will save (every rank
        # runs the forward: under ZeRO-3 it gathers the weights collectively)
        dataset = self.run.dataset(ctx.task, self.run.config.data.eval_split)
        batch = ctx.collate_fn([dataset[i] for i in range(min(len(dataset), self.run.config.eval.batch_size))])
        model = ctx.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(**model_inputs(batch)).logits
        model.train(was_training)
        # keep the last within-step checkpoint (deleted by the loop once the phase is saved)
        if is_main_process():
            keep = Path(self.run.out) / "kept_checkpoints" / f"step_{ctx.step}"
            keep.mkdir(parents=True, exist_ok=True)
            torch.save(logits, keep / "eval_logits.pt")
            folder = Path(self.run.out) / ".checkpoints" / f"step_{ctx.step}"
            checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            if checkpoints:
                shutil.copy(checkpoints[-1] / "trainable.safetensors", keep / "trainable.safetensors")
                self._step(ctx)["checkpoint"] = {"name": checkpoints[-1].name,
                                                 "files": sorted(p.name for p in checkpoints[-1].iterdir())}


class TeacherProbe(ContinualMethod):
    """Wraps MoInCL's epoch end: records the student and teacher LoRA (gathered) before and after the
    interpolation, and DeepSpeed's fp32 master copy of the student after it."""

    name = "teacher_probe"

    def __init__(self, moincl, report: dict):
        super().__init__()
        self.moincl = moincl
        self.report = report
        self.interpolate = moincl.on_epoch_end
        moincl.on_epoch_end = lambda ctx: None  # run here instead, between the two records

    def on_epoch_end(self, ctx):
        teacher = self.moincl.teacher
        if teacher is None:
            return
        marker, student_marker = ".teacher.", f".{teacher.student_adapter}."
        params = dict(ctx.model.llm.named_parameters())
        name = sorted(teacher.teacher_parameters())[0]
        old, new = params[name], params[name.replace(marker, student_marker)]
        with torch.no_grad(), gathered([old, new]):
            before_new, before_old = new.detach().clone(), old.detach().clone()
        self.interpolate(ctx)  # MoInCL's own epoch end: the interpolation
        with torch.no_grad(), gathered([old, new]):
            after = new.detach().clone()
        master = None
        if has_master_copy(new):  # (a collective: the condition holds on every rank)
            from deepspeed.utils import safe_get_full_fp32_param

            with gathered([new]):
                master = safe_get_full_fp32_param(new)
        alpha = per_step(self.moincl.args.alpha, ctx.step)
        expected = alpha * before_new + (1 - alpha) * before_old
        self.report["interpolation"].append({
            "step": ctx.step, "epoch": ctx.epoch, "param": name, "shape": list(after.shape),
            "max_error": float((after - expected).abs().max()),
            "changed": float((after - before_new).abs().max()),
            "master_error": None if master is None else float((master.reshape(after.shape) - after).abs().max()),
        })


def main(argv: list[str]) -> int:
    prefix, recipe, *overrides = argv
    config = load_recipe(recipe, overrides)
    run = ContinualRun(config, source=recipe)
    report: dict = {"steps": {}, "interpolation": []}
    moincl = next((m for m in run.methods if m.name == "moincl"), None)
    if moincl is not None:
        run.methods.append(TeacherProbe(moincl, report))
    run.methods.append(Probe(run, report))
    generate = type(run.model).generate
    report["generate_calls"] = 0

    def counted(*args, **kwargs):
        report["generate_calls"] += 1
        return generate(run.model, *args, **kwargs)

    run.model.generate = counted  # evaluation batches this rank generated
    results = run.run()
    trainer = run._trainer
    report["log_history"] = {}
    for step in run.finished_steps():
        report["log_history"][str(step["step"])] = [e["loss"] for e in step["log_history"] if "loss" in e]
        report.setdefault("schedule", {})[str(step["step"])] = {
            "optimizer_steps": step.get("optimizer_steps"), "warmup_steps": step.get("warmup_steps"),
            "learning_rates": [e["learning_rate"] for e in step["log_history"] if "learning_rate" in e]}
    report["average"] = results.get("average")
    report["initial_scores"] = results.get("initial_scores")
    report["matrix"] = results.get("matrix")
    report["is_main"] = is_main_process()
    report["rank"] = int(os.environ.get("RANK", "0"))
    report["trainer_world_size"] = trainer.args.world_size if trainer is not None else None
    if trainer is not None and trainer.is_deepspeed_enabled:  # what reached DeepSpeed from the recipe
        engine = trainer.model_wrapped
        report["deepspeed"] = {
            "bf16": engine.bfloat16_enabled(), "fp16": engine.fp16_enabled(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
            "train_batch_size": engine.train_batch_size(), "gradient_clipping": engine.gradient_clipping(),
        }
    report["weight_dtypes"] = sorted({str(p.dtype) for p in run.model.parameters()})
    report["optimizer_steps"] = trainer.state.global_step if trainer is not None else None
    Path(f"{prefix}.rank{report['rank']}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test dumps the stacks of a hung run
    torch.set_num_threads(int(os.environ.get("MICL_TEST_THREADS", "1")))
    sys.exit(main(sys.argv[1:]))
