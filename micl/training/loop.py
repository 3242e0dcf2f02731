"""The task-order loop: for each step, train on the step's task, evaluate every task seen so far, save
the phase and the results matrix; re-running the same command resumes where a killed run stopped.

Run folder:
    run_config.json                  the recipe as resolved (a rerun must match it)
    initial_scores.json              scores of the untrained model (baseline of FWT), if enabled
    step_<k>_<task>/                 one folder per finished step, moved into place atomically:
        adapter/ projectors.safetensors micl_model.json   the phase (MultimodalLM.from_pretrained)
        metrics.json predictions.jsonl method_state.pt
    .checkpoints/step_<k>/checkpoint-N/   within-step Trainer checkpoints (deleted once the step is saved)
    results.json report.md matrix.png forgetting.png
    hub_push.json                    what `push_to_hub` / `micl push` published (micl/hub.py)
A finished step is a step folder with metrics.json; results.json is rebuilt from them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from functools import cached_property
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from ..config import RecipeConfig
from ..data.collator import MultimodalCollator
from ..data.dataset import EncodedTaskDataset
from ..data.orders import resolve_order
from ..data.prompts import load_templates
from ..data.schema import STREAMS, media_streams
from ..data.tasks import get_task, load_task_split, recipe_tasks, split_path, use_recipe_tasks
from ..errors import ConfigError, MiclError
from ..evaluation.continual import continual_metrics
from ..evaluation.report import write_report
from ..methods import StepContext, build_methods
from ..modeling.encoders.registry import build_encoders
from ..adapters import build_peft_config
from ..modeling.feature_store import STORE_DTYPES, FeatureStores, SampleFeatures
from ..modeling.llm import cache_root, load_llm
from ..modeling.multimodal import MultimodalLM
from ..modeling.prompting import PromptBuilder
from ..utils.distributed import (barrier, deepspeed_zero_stage, gathered, init_distributed, is_main_process,
                                 launch_device, main_process_first, plain_model_loading,
                                 training_arguments_kwargs, world_size)
from ..utils.io import atomic_write_json, safe_torch_load
from .checkpoint_layout import LayoutCallback, check_resumable
from .evaluation import evaluate_task
from .early_stopping import EarlyStopping
from .trainer import MiclTrainer

logger = logging.getLogger(__name__)

# what a run's results depend on: a rerun into the same output_dir must match (decoding settings included,
# or one matrix would mix them)
RUN_IDENTITY_KEYS = ("order", "tasks", "seed", "method", "method_args", "model", "lora", "data", "train", "eval")
# how a run is computed, not what: may change when a run is resumed (e.g. checkpointing after an OOM, another
# machine). `train.num_threads` changes only the float summation order of CPU kernels (results agree to
# rounding, not bitwise), and pinning a run to its first machine's core count would block resuming it elsewhere;
# `eval.batch_size` only regroups the same prompts (left padding, positions from the attention mask)
RUNTIME_KEYS = {"model": ("attn_implementation",),
                "train": ("gradient_checkpointing", "dataloader_num_workers", "dataloader_pin_memory", "num_threads",
                          "ddp_timeout", "tensorboard", "save_steps"),
                "eval": ("batch_size",)}


def step_dir_name(step: int, task: str) -> str:
    return f"step_{step}_{task}"


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _activation_checkpointing(enabled: bool) -> dict:
    """`train.gradient_checkpointing` as TrainingArguments take it (transformers 5 renamed the setting)."""
    if not enabled:
        return {}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def _checkpoint_complete(folder: Path) -> bool:
    """A process killed while the Trainer writes a checkpoint leaves it partial: resume from an older one.
    Under DeepSpeed the optimizer state is DeepSpeed's own checkpoint (`latest` names its folder)."""
    optimizer = (folder / "optimizer.pt").is_file() or (folder / "latest").is_file()
    return optimizer and all((folder / name).is_file() for name in ("trainable.safetensors", "trainer_state.json"))


def _identity(config: dict, key: str):
    """`config[key]` without its RUNTIME_KEYS."""
    value = config.get(key)
    if isinstance(value, dict) and key in RUNTIME_KEYS:
        value = {k: v for k, v in value.items() if k not in RUNTIME_KEYS[key]}
    return value


def _with_defaults(stored: dict) -> dict:
    """A stored run_config with the settings added to micl after it was written filled in at their
    defaults: a run made before a new setting existed (e.g. `lora.type`) still resumes."""
    defaults = RecipeConfig().to_dict()
    filled = dict(stored)
    for key, value in defaults.items():
        filled.setdefault(key, value)  # a section newer than the run (e.g. `tasks`)
        if isinstance(value, dict) and isinstance(stored.get(key), dict) and key != "method_args":
            filled[key] = {**value, **stored[key]}
    return filled


class ContinualRun:
    def __init__(self, config: RecipeConfig, source: str = "recipe"):
        self.config = config
        self.source = source
        self.out = Path(config.output_dir)
        use_recipe_tasks(recipe_tasks(config.tasks, source))  # the recipe's own tasks, next to eval/tasks.yaml
        self.tasks = [get_task(name) for name in resolve_order(config.order)]
        self.methods = build_methods(config, source)
        self.data_root = Path(config.data.root)
        self._model = None
        self._encoders = None
        self.feature_stores = FeatureStores(cache_root() / "feature_store")
        self.templates = load_templates(config.data.templates)
        self._datasets: dict[tuple[str, str], EncodedTaskDataset] = {}
        self._stored: set[tuple[str, str]] = set()  # splits whose stores are complete here (reopened alone)
        self.push_error: MiclError | None = None  # last failed push_to_hub (the next push completes it)
        self._trainer: MiclTrainer | None = None  # the last step's, under DeepSpeed (its engine serves evaluation)

    # ---- setup --------------------------------------------------------------------------------------
    def _check_or_write_run_config(self) -> None:
        resolved = self.config.to_dict()
        resolved["order"] = [t.name for t in self.tasks]
        path = self.out / "run_config.json"
        if path.is_file():
            previous = _with_defaults(json.loads(path.read_text()))
            changed = [k for k in RUN_IDENTITY_KEYS if _identity(previous, k) != _identity(resolved, k)]
            if changed:
                raise ConfigError(
                    f"{path}: output_dir already holds a run with different settings ({', '.join(changed)}); "
                    f"resume it with the same recipe or choose another output_dir"
                )
            return
        if is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, resolved)

    def _ensure_data(self) -> None:
        synth = [t.name for t in self.tasks if t.synthetic]
        if synth:
            from ..data.synth import generate_synth

            data = self.config.data
            generate_synth(self.data_root, seed=data.synth_seed, n_train=data.synth_train,
                           n_val=data.synth_val, n_test=data.synth_test, tasks=synth)

    @property
    def model(self) -> MultimodalLM:
        if self._model is None:
            cfg = self.config.model
            set_seed(self.config.seed)
            # the embedded LLM is converted and cached on first use; loaded whole (see plain_model_loading)
            with main_process_first(), plain_model_loading():
                llm, tokenizer = load_llm(cfg.llm, cfg.dtype, cfg.trust_remote_code, cfg.attn_implementation)
            media_dims = {m: enc.output_dim for m, enc in self.encoders.items()}
            settings = {"llm": cfg.llm, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code,
                        "projector_hidden": cfg.projector_hidden, "system_prompt": cfg.system_prompt,
                        "encoders": {m: e.identity for m, e in self.encoders.items()}}
            model = MultimodalLM.with_adapter(llm, tokenizer, media_dims, build_peft_config(self.config.lora),
                                              cfg.projector_hidden, settings)
            self._model = model.to(launch_device())  # the evaluations before the first Trainer run there too
        return self._model

    @cached_property
    def builder(self) -> PromptBuilder:
        return PromptBuilder(self.model.tokenizer, self.config.model.system_prompt)

    @property
    def encoders(self):
        """On this process's device; in the model dtype on an accelerator (float32 compute on the CPU)."""
        if self._encoders is None:
            self._encoders = build_encoders(self.config.model)
            device = launch_device()
            dtype = STORE_DTYPES[self.config.model.dtype] if device.type != "cpu" else torch.float32
            for encoder in self._encoders.values():
                encoder.place(device, dtype)
        return self._encoders

    def dataset(self, task, split: str, shared: bool | None = None) -> EncodedTaskDataset:
        """A split's samples and features. `shared`: every process opens it at this point together, so a
        missing feature store is encoded by all of them (default: the first time this process opens the split;
        a split reopened after its release is read alone)."""
        key = (task.name, split)
        if key not in self._datasets:
            data = self.config.data
            limit = data.max_train_samples if split == "train" else data.max_eval_samples
            samples = load_task_split(self.data_root, task.name, split, limit)
            media = [dict(media_streams(s)) for s in samples]
            store_dtype = STORE_DTYPES[self.config.model.feature_dtype or self.config.model.dtype]
            streams = {}
            for stream in STREAMS[task.modality]:  # a video with its sound: the video, then its audio
                paths = [str(self.data_root / m[stream]) for m in media]
                with plain_model_loading():  # an encoder loads (whole) on first use
                    streams[stream] = self.feature_stores.features(
                        self.encoders[stream], paths, store_dtype, desc=f"encoding {task.name}/{split} ({stream})",
                        shared=key not in self._stored if shared is None else shared)
            self._stored.add(key)
            self._datasets[key] = EncodedTaskDataset(samples, SampleFeatures(streams, len(samples)), self.builder,
                                                     self.templates, train=split == "train", seed=self.config.seed)
        return self._datasets[key]

    def method_dataset(self, task, split: str) -> EncodedTaskDataset:
        """`ctx.dataset_fn`: methods open past tasks' splits on their own schedule (a replay draw is per
        process), so without collectives: a store missing there (a run resumed on another machine) is built by
        the process alone, under the store's lock."""
        return self.dataset(task, split, shared=False)

    def release_datasets(self) -> None:
        """After a step: drops the training and validation data of the tasks learned so far (this step's, and
        past tasks' reopened by replay). Their features stay on disk: a method that keeps a memory of a task
        reopens it through `dataset_fn` without encoding anything. The evaluation split stays (it is scored
        after every later step)."""
        for key in [k for k in self._datasets if k[1] in ("train", "val") and k[1] != self.config.data.eval_split]:
            del self._datasets[key]

    # ---- steps --------------------------------------------------------------------------------------
    def finished_steps(self) -> list[dict]:
        finished = []
        for step, task in enumerate(self.tasks):
            metrics_file = self.out / step_dir_name(step, task.name) / "metrics.json"
            if not metrics_file.is_file():
                break
            finished.append(json.loads(metrics_file.read_text()))
        return finished

    def _evaluate(self, task, desc: str, split: str | None = None) -> dict:
        """Called on every rank: each generates its share of the batches (training/evaluation.py), the main
        process scores; the other ranks' result has score None."""
        dataset = self.dataset(task, split or self.config.data.eval_split)
        return evaluate_task(self.model, task, dataset, self.config.eval, desc, sharded=True)

    def _initial_scores(self) -> list[float] | None:
        if not self.config.eval.forward_transfer:
            return None
        path = self.out / "initial_scores.json"
        if path.is_file():
            return json.loads(path.read_text())["scores"]
        scores = [self._evaluate(t, f"initial eval {t.name}")["score"] for t in self.tasks]
        if is_main_process():
            atomic_write_json(path, {"tasks": [t.name for t in self.tasks], "scores": scores})
        return scores

    def _training_args(self, step: int, dataset) -> TrainingArguments:
        train = self.config.train
        from transformers.training_args import OptimizerNames

        if train.optim not in {o.value for o in OptimizerNames}:
            raise ConfigError(f"train.optim: unknown optimizer {train.optim!r}; valid: "
                              f"{', '.join(o.value for o in OptimizerNames)}")
        return TrainingArguments(
            output_dir=str(self.out / ".checkpoints" / f"step_{step}"),
            per_device_train_batch_size=train.batch_size,
            gradient_accumulation_steps=train.grad_accum,
            num_train_epochs=train.epochs,
            learning_rate=train.lr,
            weight_decay=train.weight_decay,
            optim=train.optim,
            lr_scheduler_type=train.lr_scheduler,
            # a ratio: the Trainer takes it of the real optimizer steps (processes and accumulation included)
            warmup_steps=train.warmup_ratio,
            max_grad_norm=train.max_grad_norm,
            ddp_timeout=int(train.ddp_timeout),
            logging_steps=train.logging_steps,
            save_strategy="steps",
            save_steps=train.save_steps,
            save_total_limit=1,
            seed=self.config.seed + step,
            report_to=[],
            remove_unused_columns=False,
            dataloader_num_workers=train.dataloader_num_workers,
            dataloader_pin_memory=train.dataloader_pin_memory,
            **_activation_checkpointing(train.gradient_checkpointing),
            bf16=self.config.model.dtype == "bfloat16",
            fp16=self.config.model.dtype == "float16",
            # {} in a single process; under a launcher: process group, DeepSpeed JSON (docs/distributed.md)
            **training_arguments_kwargs(self.model.llm.get_input_embeddings().embedding_dim),
        )

    def _tensorboard(self, step: int) -> list:
        """TensorBoard logs in <output_dir>/logs/step_<k> (the Trainer's default folder is the checkpoint
        folder, which is deleted once the step is saved)."""
        if not (self.config.train.tensorboard and _tensorboard_available() and is_main_process()):
            return []
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(self.out / "logs" / f"step_{step}")))]

    def _train_step(self, step: int, task, ctx: StepContext) -> dict:
        dataset = ctx.train_dataset
        self._release_trainer()
        args = self._training_args(step, dataset)
        early_stopping = self._early_stopping(task)
        trainer = MiclTrainer(
            model=self.model,
            args=args,
            train_dataset=dataset,
            data_collator=MultimodalCollator(self.model.tokenizer.pad_token_id),
            methods=self.methods,
            ctx=ctx,
            callbacks=[LayoutCallback(), *self._tensorboard(step)],
            projector_lr=self.config.train.projector_lr,
            early_stopping=early_stopping,
        )
        checkpoints = sorted((p for p in Path(args.output_dir).glob("checkpoint-*") if _checkpoint_complete(p)),
                             key=lambda p: int(p.name.split("-")[1]))
        resume = str(checkpoints[-1]) if checkpoints else None
        if resume:
            check_resumable(resume, step)  # written by the same launch (micl/training/checkpoint_layout.py)
            logger.info("resuming step %d from %s", step, resume)
        started = time.time()
        result = trainer.train(resume_from_checkpoint=resume)
        if trainer.is_deepspeed_enabled:  # kept for its engine (see _release_trainer)
            self._trainer = trainer
        epochs = trainer.state.epoch or self.config.train.epochs  # fewer when stopped early
        tokens = round(sum(dataset.input_length(i) for i in range(len(dataset))) * epochs)
        # mean of the logged losses: the Trainer's own training_loss only covers the part after a resume
        logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return {
            "train_loss": sum(logged) / len(logged) if logged else result.training_loss,
            "train_runtime_s": time.time() - started,
            "train_tokens": tokens,
            "resumed_from": Path(resume).name if resume else None,
            "optimizer_steps": trainer.state.global_step,
            "warmup_steps": args.get_warmup_steps(trainer.state.max_steps),
            "log_history": trainer.state.log_history,
            **({"early_stopping": early_stopping.summary()} if early_stopping is not None else {}),
        }

    def _early_stopping(self, task) -> EarlyStopping | None:
        patience = self.config.train.early_stopping_patience
        if patience is None:
            return None
        if deepspeed_zero_stage() == 3:
            raise ConfigError("train.early_stopping_patience: not supported under DeepSpeed ZeRO-3 (the best "
                              "epoch's weights would be shards); use ZeRO-2 or DDP")
        dataset = self.dataset(task, "val")
        if not len(dataset):
            raise ConfigError(f"train.early_stopping_patience: task {task.name} has no validation samples "
                              f"({split_path(self.data_root, task.name, 'val')})")
        return EarlyStopping(self.model, lambda: self._evaluate(task, f"val {task.name}", "val")["score"], patience)

    def _release_trainer(self) -> None:
        """Destroys the previous step's DeepSpeed engine (its ZeRO-3 hooks gather the weights for the
        evaluations and the teacher until the next step's engine takes over the same model)."""
        if self._trainer is not None:
            self._trainer.accelerator.free_memory()
            self._trainer = None

    def _save_phase(self, step: int, task, record: dict, predictions: dict) -> Path:
        """Every rank enters (gathering ZeRO-3 shards is collective); the main process writes."""
        final = self.out / step_dir_name(step, task.name)
        with gathered(self.model.saved_parameters()):
            if is_main_process():
                self._write_phase(final, record, predictions)
        barrier()
        return final

    def _write_phase(self, final: Path, record: dict, predictions: dict) -> None:
        tmp = self.out / f".{final.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save_pretrained(tmp)
        torch.save([m.state_dict() for m in self.methods], tmp / "method_state.pt")
        with open(tmp / "predictions.jsonl", "w") as handle:
            for task_name, rows in predictions.items():
                for row in rows:
                    handle.write(json.dumps({"task": task_name, **row}) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(record, indent=2))
        if final.exists():  # a half-finished earlier attempt: metrics.json is missing there
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _restore(self, finished: list[dict]) -> None:
        last = finished[-1]
        folder = self.out / step_dir_name(last["step"], last["task"])
        self.model.load_phase(folder)
        states = safe_torch_load(folder / "method_state.pt")
        for method, state in zip(self.methods, states):
            method.load_state_dict(state)
        logger.info("restored %s", folder)

    def write_results(self) -> dict:
        """Main process: writes results.json and the report. The other ranks wait and read results.json."""
        if not is_main_process():
            barrier()
            return json.loads((self.out / "results.json").read_text())
        results = self._write_results()
        barrier()
        return results

    def _write_results(self) -> dict:
        finished = self.finished_steps()
        names = [t.name for t in self.tasks]
        matrix = [row["row"] + [None] * (len(names) - len(row["row"])) for row in finished]
        initial_file = self.out / "initial_scores.json"
        initial = json.loads(initial_file.read_text())["scores"] if initial_file.is_file() else None
        pre_step = [row.get("pre_step_score") for row in finished]
        results = {
            "tasks": names,
            "matrix": matrix,
            **continual_metrics(matrix, initial_scores=initial, pre_step_scores=pre_step),
            "initial_scores": initial,
            "pre_step_scores": pre_step,
            "steps": [{k: v for k, v in row.items() if k != "log_history"} for row in finished],
            "complete": len(finished) == len(names),
            "config": self.config.to_dict(),
        }
        atomic_write_json(self.out / "results.json", results)
        write_report(self.out)
        return results

    def run(self) -> dict:
        if self.config.train.num_threads:
            torch.set_num_threads(self.config.train.num_threads)
        init_distributed(self.config.train.ddp_timeout)  # a no-op in a single process; docs/distributed.md
        self._check_zero3_methods()
        self._check_or_write_run_config()
        barrier()
        with main_process_first():
            self._ensure_data()
        finished = self.finished_steps()
        if len(finished) == len(self.tasks):
            if is_main_process():
                print(f"{self.out}: all {len(self.tasks)} steps already finished")
            self._push_to_hub()  # completes a push that failed earlier
            return self._check_push(self.write_results())
        initial = self._initial_scores()
        if finished:
            self._restore(finished)
            if is_main_process():
                print(f"{self.out}: resuming after step {len(finished)}/{len(self.tasks)}")
        for step in range(len(finished), len(self.tasks)):
            self._run_step(step, initial)
        return self._check_push(self.write_results())

    def _check_zero3_methods(self) -> None:
        """Under ZeRO-3 every rank must run the same forward passes and read weights only through gathers.
        EWC (Fisher from autograd.grad of the partitioned weights) and replay (per-rank draws that can
        touch another modality's projector on one rank only) do not; refused instead of a deadlock."""
        if deepspeed_zero_stage() != 3:
            return
        unsupported = [m.name for m in self.methods if not m.supports_zero3]
        if unsupported:
            raise ConfigError(f"method {', '.join(unsupported)} is not supported under DeepSpeed ZeRO-3 (weights "
                              f"partitioned across processes); use ZeRO-2 or DDP (docs/distributed.md)")

    def _push_to_hub(self) -> None:
        """Recipe `push_to_hub`: publish the finished phases not yet on the Hub (micl/hub.py). A failure is
        reported and the run goes on: the finished steps are untouched, the next push completes it."""
        if not self.config.push_to_hub or not is_main_process():
            return
        from ..hub import push_run

        def report(result: dict) -> None:
            if result["status"] == "pushed":
                print(f"[micl] pushed {result['phase']} to {result['repo']} branch {result['branch']}", flush=True)

        try:
            push_run(self.out, self.config.hub_repo, private=self.config.hub_private, report=report)
            self.push_error = None
        except MiclError as err:
            self.push_error = err
            print(f"[micl] push to the Hub failed (the step is saved): {err}", file=sys.stderr, flush=True)

    def _check_push(self, results: dict) -> dict:
        if self.push_error is not None:
            raise MiclError(f"all steps are saved, but the push to the Hub failed: {self.push_error}; "
                            f"`micl push {self.out} --repo {self.config.hub_repo}` completes it")
        return results

    def _run_step(self, step: int, initial) -> None:
        task = self.tasks[step]
        started = time.time()
        pre_step = None
        if initial is not None:
            pre_step = initial[step] if step == 0 else self._evaluate(task, f"pre-step eval {task.name}")["score"]
        ctx = StepContext(step=step, task=task, seen_tasks=self.tasks[:step], model=self.model,
                          train_dataset=self.dataset(task, "train"), run_dir=str(self.out), seed=self.config.seed,
                          batch_size=self.config.train.batch_size,
                          dataset_fn=self.method_dataset,
                          collate_fn=MultimodalCollator(self.model.tokenizer.pad_token_id))
        for method in self.methods:
            method.on_task_start(ctx)
        train_stats = self._train_step(step, task, ctx)
        for method in self.methods:
            method.on_task_end(ctx)
        metrics, predictions = {}, {}
        for seen in self.tasks[: step + 1]:
            result = self._evaluate(seen, f"eval {seen.name} after step {step}")
            predictions[seen.name] = result.pop("predictions")
            metrics[seen.name] = result
        record = {
            "step": step,
            "task": task.name,
            "row": [metrics[t.name]["score"] for t in self.tasks[: step + 1]],
            "metrics": metrics,
            "pre_step_score": pre_step,
            **train_stats,
            "world_size": world_size(),  # processes that trained the step
            "step_runtime_s": time.time() - started,
        }
        self._save_phase(step, task, record, predictions)
        self.release_datasets()
        if is_main_process():
            shutil.rmtree(self.out / ".checkpoints" / f"step_{step}", ignore_errors=True)
        results = self.write_results()
        if not is_main_process():
            return
        scores = " ".join(f"{t.name}={metrics[t.name]['score']:.1f}" for t in self.tasks[: step + 1])
        average = results.get("average")
        print(
            f"[micl] step {step + 1}/{len(self.tasks)} {task.name}: loss {train_stats['train_loss']:.3f} | "
            f"{scores} | avg {average:.1f} | {record['step_runtime_s']:.0f}s",
            flush=True,
        )
        self._push_to_hub()


def train(config: RecipeConfig, source: str = "recipe") -> dict:
    return ContinualRun(config, source).run()
