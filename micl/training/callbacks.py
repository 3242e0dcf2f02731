"""Run callbacks: what a run does besides training and evaluating, at the points of the task-order loop
(the Trainer's own callbacks work within a step; these work across steps). A run gets its callbacks from
`run_callbacks(config)`; each hook runs on every process (a callback that writes checks the main process)."""

from __future__ import annotations

import sys

from ..config import RecipeConfig
from ..errors import MiclError
from ..run_folder import RunFolder
from ..utils.distributed import is_main_process


class RunCallback:
    def trainer_callbacks(self, step: int) -> list:
        """transformers TrainerCallbacks to add to the step's Trainer."""
        return []

    def on_step_end(self, step: int, record: dict, results: dict) -> None:
        """After step `step` is saved and results.json rewritten."""

    def on_run_end(self, results: dict) -> None:
        """After the last step (also when a finished run is started again)."""


class TensorBoardLogs(RunCallback):
    """TensorBoard logs in <output_dir>/logs/step_<k> (the Trainer's default folder is the checkpoint folder,
    which is deleted once the step is saved). Only when tensorboard is installed."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

    @staticmethod
    def available() -> bool:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return False
        return True

    def trainer_callbacks(self, step: int) -> list:
        if not is_main_process():
            return []
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(self.folder.logs(step))))]


class HubPush(RunCallback):
    """Recipe `push_to_hub`: publishes the finished phases not yet on the Hub after every step (micl/hub.py).
    A failure is reported and the run goes on (the finished steps are untouched; the next push completes it);
    at the end of the run a push that still failed is an error."""

    def __init__(self, folder: RunFolder, repo: str, private: bool):
        self.folder = folder
        self.repo = repo
        self.private = private
        self.error: MiclError | None = None
        self.pushed = False

    def push(self) -> None:
        if not is_main_process():
            return
        from ..hub import push_run

        def report(result: dict) -> None:
            if result["status"] == "pushed":
                print(f"[micl] pushed {result['phase']} to {result['repo']} branch {result['branch']}", flush=True)

        try:
            push_run(self.folder.path, self.repo, private=self.private, report=report)
            self.error = None
        except MiclError as err:
            self.error = err
            print(f"[micl] push to the Hub failed (the step is saved): {err}", file=sys.stderr, flush=True)

    def on_step_end(self, step: int, record: dict, results: dict) -> None:
        self.push()
        self.pushed = True

    def on_run_end(self, results: dict) -> None:
        if not self.pushed:  # every step was finished before this run: completes a push that failed earlier
            self.push()
        if self.error is not None:
            raise MiclError(f"all steps are saved, but the push to the Hub failed: {self.error}; "
                            f"`micl push {self.folder.path} --repo {self.repo}` completes it")


def run_callbacks(config: RecipeConfig, folder: RunFolder) -> list[RunCallback]:
    callbacks: list[RunCallback] = []
    if config.train.tensorboard and TensorBoardLogs.available():
        callbacks.append(TensorBoardLogs(folder))
    if config.push_to_hub:
        callbacks.append(HubPush(folder, config.hub_repo, config.hub_private))
    return callbacks
