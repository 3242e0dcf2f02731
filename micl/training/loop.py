"""The task-order recipe: set up, then for each step of the order train on the step's task, evaluate every
task seen so far and save the phase; re-running the same command resumes where a killed run stopped.

The parts, one job each: the run folder's layout (micl/run_folder.py), what identifies a run
(run_identity.py), the tasks' data and features (task_data.py), the step's Trainer (trainer_factory.py),
results.json (results.py), and callbacks for what a run does besides (callbacks.py: TensorBoard, Hub push).
"""

from __future__ import annotations

import json
import logging
import time
from functools import cached_property

import torch

from ..config import RecipeConfig
from ..data.collator import MultimodalCollator
from ..data.orders import resolve_order
from ..data.tasks import get_task, recipe_tasks, use_recipe_tasks
from ..methods import StepContext, build_methods
from ..modeling.multimodal import MultimodalLM
from ..modeling.prompting import PromptBuilder
from ..preflight import preflight
from ..run_folder import RunFolder
from ..utils.distributed import (barrier, deepspeed_zero_stage, init_distributed, is_main_process, main_process_first,
                                 world_size)
from ..utils.io import atomic_write_json
from . import trainer_factory
from .model_factory import build_model
from .phases import restore_phase, save_phase
from .callbacks import run_callbacks
from .early_stopping import EarlyStopping
from .evaluation import decoding_settings, evaluate_task, main_metric
from .results import metric_line, write_results
from .run_identity import check_or_write
from .schedule import JointDataset, StepPlan, plan_steps, run_schedule
from .task_data import TaskData
from . import usage

logger = logging.getLogger(__name__)

#: the training statistics of a step that trains nothing (schedule "untrained")
NO_TRAINING = {"train_loss": None, "train_runtime_s": 0.0, "train_tokens": 0, "resumed_from": None,
               "optimizer_steps": 0, "warmup_steps": 0, "log_history": []}


class ContinualRun:
    def __init__(self, config: RecipeConfig, source: str = "recipe"):
        self.config = config
        self.source = source
        self.folder = RunFolder(config.output_dir)
        use_recipe_tasks(recipe_tasks(config.tasks, source))  # the recipe's own tasks, next to eval/tasks.yaml
        self.tasks = [get_task(name) for name in resolve_order(config.order)]
        self.methods = build_methods(config, source)
        self.schedule = run_schedule(self.methods)
        self.plan: list[StepPlan] = plan_steps(self.tasks, self.schedule)
        self.data = TaskData(config)
        self.callbacks = run_callbacks(config, self.folder)
        self._model: MultimodalLM | None = None
        self._trainer = None  # the last step's, under DeepSpeed (its engine serves evaluation)

    @property
    def out(self):
        return self.folder.path

    # ---- the recipe -----------------------------------------------------------------------------------
    def run(self) -> dict:
        self._peak_rss_reset = usage.reset_peak_rss()  # step 0's window includes the setup and initial evaluation
        self._setup()
        finished = self.finished_steps()
        if len(finished) == len(self.plan):
            if is_main_process():
                print(f"{self.out}: all {len(self.plan)} steps already finished")
        else:
            initial = self._initial_scores()
            if finished:
                self._restore(finished)
                if is_main_process():
                    print(f"{self.out}: resuming after step {len(finished)}/{len(self.plan)}")
            for step in range(len(finished), len(self.plan)):
                self._run_step(step, initial)
        results = self.write_results()
        for callback in self.callbacks:
            callback.on_run_end(results)
        return results

    def _setup(self) -> None:
        preflight(self.config, self.source, zero_stage=deepspeed_zero_stage())  # before anything loads or is written
        if self.config.train.num_threads:
            torch.set_num_threads(self.config.train.num_threads)
        init_distributed(self.config.train.ddp_timeout)  # a no-op in a single process; docs/distributed.md
        check_or_write(self.folder, self.resolved_config(), write=is_main_process())
        barrier()
        with main_process_first():
            self.data.ensure_synthetic(self.tasks)

    def resolved_config(self) -> dict:
        """What run_config.json records: the recipe with its order as task names (and the phases, where a step is
        not one task)."""
        resolved = {**self.config.to_dict(), "order": [t.name for t in self.tasks]}
        if self.schedule != "sequential":
            resolved["phases"] = [plan.name for plan in self.plan]
        return resolved

    def _first_task(self, step: int) -> int:
        """The position in the order of the step's first task (the steps' tasks are consecutive runs of it)."""
        return sum(len(plan.tasks) for plan in self.plan[:step])

    def _seen_tasks(self, step: int) -> list:
        """The tasks learned by the end of `step`."""
        return self.tasks[: self._first_task(step + 1)]

    def _run_step(self, step: int, initial: list[float] | None) -> None:
        plan = self.plan[step]
        started = time.time()
        eval_seconds = 0.0
        pre_step = {}
        if initial is not None:
            for position, task in enumerate(plan.tasks, start=self._first_task(step)):
                if step == 0:
                    pre_step[task.name] = initial[position]
                else:
                    result = self._evaluate(task, f"pre-step eval {task.name}")
                    pre_step[task.name], eval_seconds = result["score"], eval_seconds + result["runtime_s"]
        ctx = self._step_context(step, plan)
        for method in self.methods:
            method.on_task_start(ctx)
        trainable = usage.trainable_parameters(self.model) if plan.trains else 0
        train_stats = self._train(step, plan, ctx) if plan.trains else dict(NO_TRAINING)
        for method in self.methods:
            method.on_task_end(ctx)
        seen = self._seen_tasks(step)
        method_metrics = {m.name: values for m in self.methods if (values := m.step_metrics(ctx))}
        metrics, predictions = {}, {}
        for task in seen:
            result = self._evaluate(task, f"eval {task.name} after step {step}")
            eval_seconds += result.pop("runtime_s")
            predictions[task.name] = result.pop("predictions")
            metrics[task.name] = result
        record = {
            "step": step,
            "task": plan.name,
            "tasks": [t.name for t in plan.tasks],  # learned at this step (evaluated only, when it trains nothing)
            "row": [metrics[t.name]["score"] for t in seen],
            "metrics": metrics,
            "pre_step_scores": pre_step,
            **({"method_metrics": method_metrics} if method_metrics else {}),
            **train_stats,
            "trainable_params": trainable,
            "eval_runtime_s": eval_seconds,  # scoring the tasks before and after training (not encoding media)
            "peak_rss_bytes": usage.peak_rss_bytes(),
            "peak_rss_window": "step" if self._peak_rss_reset else "process",  # since the step began / process start
            "world_size": world_size(),  # processes that trained the step
            "step_runtime_s": time.time() - started,
        }
        self._save_phase(step, plan.name, record, predictions)  # adds extra_storage_bytes to the record
        self.data.release()
        if is_main_process():
            self.folder.remove_checkpoints(step)
        results = self.write_results()
        self._peak_rss_reset = usage.reset_peak_rss()
        if is_main_process():
            scores = " ".join(f"{t.name}={metrics[t.name]['score']:.1f}" for t in seen)
            loss = "no training" if train_stats["train_loss"] is None else f"loss {train_stats['train_loss']:.3f}"
            print(f"[micl] step {step + 1}/{len(self.plan)} {plan.name}: {loss} | {scores} | "
                  f"{metric_line(results)} | {record['step_runtime_s']:.0f}s", flush=True)
        for callback in self.callbacks:
            callback.on_step_end(step, record, results)

    # ---- setup ----------------------------------------------------------------------------------------
    @property
    def model(self) -> MultimodalLM:
        if self._model is None:
            self._model = build_model(self.config, self.data)
            self.data.builder = self.builder
        return self._model

    @cached_property
    def builder(self) -> PromptBuilder:
        return PromptBuilder(self.model.tokenizer, self.config.model.system_prompt)

    def dataset(self, task, split: str, shared: bool | None = None):
        self.model  # noqa: B018  (the prompts need its tokenizer)
        return self.data.dataset(task, split, shared)

    @property
    def feature_stores(self):
        return self.data.feature_stores

    # ---- steps ----------------------------------------------------------------------------------------
    def finished_steps(self) -> list[dict]:
        return self.folder.finished_records([plan.name for plan in self.plan])

    def _step_context(self, step: int, plan: StepPlan) -> StepContext:
        # a step of several tasks (or none) has the recipe's only method (check_capabilities): ctx.task is its first
        return StepContext(step=step, task=plan.tasks[0], seen_tasks=self.tasks[: self._first_task(step)],
                           model=self.model, train_dataset=self._train_dataset(plan), run_dir=str(self.out),
                           seed=self.config.seed, batch_size=self.config.train.batch_size,
                           dataset_fn=self._method_dataset,
                           collate_fn=MultimodalCollator(self.model.tokenizer.pad_token_id),
                           decoding=decoding_settings(self.config.eval))

    def _train_dataset(self, plan: StepPlan):
        if not plan.trains:
            return None
        parts = [self.dataset(task, "train") for task in plan.tasks]
        return parts[0] if len(parts) == 1 else JointDataset(parts)

    def _method_dataset(self, task, split: str):
        """`ctx.dataset_fn` (TaskData.method_dataset: opened by one process alone)."""
        return self.dataset(task, split, shared=False)

    def _training_args(self, step: int, dataset=None):
        hidden = self.model.llm.get_input_embeddings().embedding_dim
        return trainer_factory.training_arguments(self.config, self.folder.checkpoints(step), step, hidden)

    def _train(self, step: int, plan: StepPlan, ctx: StepContext) -> dict:
        self._release_trainer()
        callbacks = [c for callback in self.callbacks for c in callback.trainer_callbacks(step)]
        trainer = trainer_factory.build_trainer(self.model, self._training_args(step), ctx.train_dataset,
                                                self.methods, ctx, self.config, callbacks,
                                                self._early_stopping(plan.tasks))
        stats = trainer_factory.train(trainer, step, self.config.train.epochs)
        if trainer.is_deepspeed_enabled:  # kept for its engine (see _release_trainer)
            self._trainer = trainer
        return stats

    def _early_stopping(self, tasks) -> EarlyStopping | None:
        """On the validation score of the step's task (of several: their mean, a model-selection criterion only)."""
        patience = self.config.train.early_stopping_patience
        if patience is None:
            return None
        for task in tasks:
            self.dataset(task, "val")  # opened with every process (the preflight checked it has samples)

        def score() -> float | None:
            scores = [self._evaluate(task, f"val {task.name}", "val")["score"] for task in tasks]
            return None if None in scores else sum(scores) / len(scores)  # None: another rank's (not scored there)

        return EarlyStopping(self.model, score, patience)

    def _release_trainer(self) -> None:
        """Destroys the previous step's DeepSpeed engine (its ZeRO-3 hooks gather the weights for the
        evaluations and the teacher until the next step's engine takes over the same model)."""
        if self._trainer is not None:
            self._trainer.accelerator.free_memory()
            self._trainer = None

    # ---- evaluation -----------------------------------------------------------------------------------
    def _evaluate(self, task, desc: str, split: str | None = None) -> dict:
        """Called on every rank: each generates its share of the batches (training/evaluation.py), the main
        process scores; the other ranks' result has score None."""
        dataset = self.dataset(task, split or self.config.data.eval_split)
        started = time.perf_counter()
        result = evaluate_task(self.model, task, dataset, self.config.eval, desc, sharded=True)
        result["runtime_s"] = time.perf_counter() - started  # generation and scoring (the media are encoded above)
        return result

    def _initial_scores(self) -> list[float] | None:
        if not self.config.eval.forward_transfer:
            return None
        path = self.folder.initial_scores_file
        if path.is_file():
            return json.loads(path.read_text())["scores"]
        scores = [self._evaluate(t, f"initial eval {t.name}")["score"] for t in self.tasks]
        if is_main_process():
            atomic_write_json(path, {"tasks": [t.name for t in self.tasks], "scores": scores})
        return scores

    # ---- saving and resuming --------------------------------------------------------------------------
    def _save_phase(self, step: int, name: str, record: dict, predictions: dict) -> None:
        save_phase(self.folder, step, name, self.model, self.methods, record, predictions)

    def _restore(self, finished: list[dict]) -> None:
        last = finished[-1]
        restore_phase(self.folder.phase_folder(last["step"], last["task"]), self.model, self.methods)

    def write_results(self) -> dict:
        """Main process: writes results.json and the report. The other ranks wait and read results.json."""
        if is_main_process():
            results = write_results(self.folder, [t.name for t in self.tasks], self.config.to_dict(),
                                    phases=[plan.name for plan in self.plan],
                                    task_metrics={t.name: main_metric(t) for t in self.tasks})
        barrier()
        if not is_main_process():
            results = json.loads(self.folder.results_file.read_text())
        return results


def train(config: RecipeConfig, source: str = "recipe") -> dict:
    return ContinualRun(config, source).run()
