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
from .evaluation import evaluate_task
from .results import write_results
from .run_identity import check_or_write
from .task_data import TaskData

logger = logging.getLogger(__name__)


class ContinualRun:
    def __init__(self, config: RecipeConfig, source: str = "recipe"):
        self.config = config
        self.source = source
        self.folder = RunFolder(config.output_dir)
        use_recipe_tasks(recipe_tasks(config.tasks, source))  # the recipe's own tasks, next to eval/tasks.yaml
        self.tasks = [get_task(name) for name in resolve_order(config.order)]
        self.methods = build_methods(config, source)
        self.data = TaskData(config)
        self.callbacks = run_callbacks(config, self.folder)
        self._model: MultimodalLM | None = None
        self._trainer = None  # the last step's, under DeepSpeed (its engine serves evaluation)

    @property
    def out(self):
        return self.folder.path

    # ---- the recipe -----------------------------------------------------------------------------------
    def run(self) -> dict:
        self._setup()
        finished = self.finished_steps()
        if len(finished) == len(self.tasks):
            if is_main_process():
                print(f"{self.out}: all {len(self.tasks)} steps already finished")
        else:
            initial = self._initial_scores()
            if finished:
                self._restore(finished)
                if is_main_process():
                    print(f"{self.out}: resuming after step {len(finished)}/{len(self.tasks)}")
            for step in range(len(finished), len(self.tasks)):
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
        resolved = {**self.config.to_dict(), "order": [t.name for t in self.tasks]}
        check_or_write(self.folder, resolved, write=is_main_process())
        barrier()
        with main_process_first():
            self.data.ensure_synthetic(self.tasks)

    def _run_step(self, step: int, initial: list[float] | None) -> None:
        task = self.tasks[step]
        started = time.time()
        pre_step = None
        if initial is not None:
            pre_step = initial[step] if step == 0 else self._evaluate(task, f"pre-step eval {task.name}")["score"]
        ctx = self._step_context(step, task)
        for method in self.methods:
            method.on_task_start(ctx)
        train_stats = self._train(step, task, ctx)
        for method in self.methods:
            method.on_task_end(ctx)
        method_metrics = {m.name: values for m in self.methods if (values := m.step_metrics(ctx))}
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
            **({"method_metrics": method_metrics} if method_metrics else {}),
            **train_stats,
            "world_size": world_size(),  # processes that trained the step
            "step_runtime_s": time.time() - started,
        }
        self._save_phase(step, task, record, predictions)
        self.data.release()
        if is_main_process():
            self.folder.remove_checkpoints(step)
        results = self.write_results()
        if is_main_process():
            scores = " ".join(f"{t.name}={metrics[t.name]['score']:.1f}" for t in self.tasks[: step + 1])
            print(f"[micl] step {step + 1}/{len(self.tasks)} {task.name}: loss {train_stats['train_loss']:.3f} | "
                  f"{scores} | avg {results['average']:.1f} | {record['step_runtime_s']:.0f}s", flush=True)
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
        return self.folder.finished_records([t.name for t in self.tasks])

    def _step_context(self, step: int, task) -> StepContext:
        return StepContext(step=step, task=task, seen_tasks=self.tasks[:step], model=self.model,
                           train_dataset=self.dataset(task, "train"), run_dir=str(self.out), seed=self.config.seed,
                           batch_size=self.config.train.batch_size, dataset_fn=self._method_dataset,
                           collate_fn=MultimodalCollator(self.model.tokenizer.pad_token_id))

    def _method_dataset(self, task, split: str):
        """`ctx.dataset_fn` (TaskData.method_dataset: opened by one process alone)."""
        return self.dataset(task, split, shared=False)

    def _training_args(self, step: int, dataset=None):
        hidden = self.model.llm.get_input_embeddings().embedding_dim
        return trainer_factory.training_arguments(self.config, self.folder.checkpoints(step), step, hidden)

    def _train(self, step: int, task, ctx: StepContext) -> dict:
        self._release_trainer()
        callbacks = [c for callback in self.callbacks for c in callback.trainer_callbacks(step)]
        trainer = trainer_factory.build_trainer(self.model, self._training_args(step), ctx.train_dataset,
                                                self.methods, ctx, self.config, callbacks, self._early_stopping(task))
        stats = trainer_factory.train(trainer, step, self.config.train.epochs)
        if trainer.is_deepspeed_enabled:  # kept for its engine (see _release_trainer)
            self._trainer = trainer
        return stats

    def _early_stopping(self, task) -> EarlyStopping | None:
        patience = self.config.train.early_stopping_patience
        if patience is None:
            return None
        self.dataset(task, "val")  # opened with every process (the preflight checked it has samples)
        return EarlyStopping(self.model, lambda: self._evaluate(task, f"val {task.name}", "val")["score"], patience)

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
        return evaluate_task(self.model, task, dataset, self.config.eval, desc, sharded=True)

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
    def _save_phase(self, step: int, task, record: dict, predictions: dict) -> None:
        save_phase(self.folder, step, task.name, self.model, self.methods, record, predictions)

    def _restore(self, finished: list[dict]) -> None:
        last = finished[-1]
        restore_phase(self.folder.phase_folder(last["step"], last["task"]), self.model, self.methods)

    def write_results(self) -> dict:
        """Main process: writes results.json and the report. The other ranks wait and read results.json."""
        if is_main_process():
            results = write_results(self.folder, [t.name for t in self.tasks], self.config.to_dict())
        barrier()
        if not is_main_process():
            results = json.loads(self.folder.results_file.read_text())
        return results


def train(config: RecipeConfig, source: str = "recipe") -> dict:
    return ContinualRun(config, source).run()
