"""A run's task data: the frozen media encoders, the feature stores, and each task split as an
`EncodedTaskDataset` (samples + stored features + prompts).

Loading and running the encoders leaves the random state as it was (`_rng_untouched`): a store is built
when a split is first opened, which can be in the middle of a step (replay reopening a past task in a run
resumed on a machine without the stores), and a model load that initialises weights it does not find in the
checkpoint (e.g. an unused pooler) would otherwise shift every later draw of training (dropout, shuffling).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import RecipeConfig
from ..data.dataset import EncodedTaskDataset
from ..data.prompts import load_templates
from ..data.schema import STREAMS, media_streams
from ..data.tasks import load_task_split
from ..modeling.encoders.registry import build_encoders
from ..modeling.feature_store import STORE_DTYPES, FeatureStores, SampleFeatures
from ..modeling.llm import cache_root
from ..utils.distributed import launch_device, plain_model_loading


@contextmanager
def _rng_untouched():
    device = launch_device()
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(devices=[device.index or 0] if accelerator else [],
                               device_type=device.type if accelerator else "cuda"):
        yield


class TaskData:
    def __init__(self, config: RecipeConfig):
        self.config = config
        self.root = Path(config.data.root)
        self.templates = load_templates(config.data.templates)
        self.feature_stores = FeatureStores(cache_root() / "feature_store")
        self.builder = None  # the PromptBuilder, set once the model's tokenizer exists
        self._encoders = None
        self._datasets: dict[tuple[str, str], EncodedTaskDataset] = {}
        self._stored: set[tuple[str, str]] = set()  # splits whose stores are complete here (reopened alone)

    def ensure_synthetic(self, tasks) -> None:
        """micl-synth tasks are generated into the data root on first use."""
        synth = [t.name for t in tasks if t.synthetic]
        if synth:
            from ..data.synth import generate_synth

            data = self.config.data
            generate_synth(self.root, seed=data.synth_seed, n_train=data.synth_train, n_val=data.synth_val,
                           n_test=data.synth_test, tasks=synth)

    @property
    def encoders(self):
        """On this process's device; in the model dtype on an accelerator (float32 compute on the CPU)."""
        if self._encoders is None:
            device = launch_device()
            dtype = STORE_DTYPES[self.config.model.dtype] if device.type != "cpu" else torch.float32
            with _rng_untouched():
                self._encoders = build_encoders(self.config.model)
                for encoder in self._encoders.values():
                    encoder.weight_locations()  # a folder without weights fails here, before the LLM loads
                    encoder.place(device, dtype)
        return self._encoders

    def media_dims(self) -> dict[str, int]:
        return {modality: encoder.output_dim for modality, encoder in self.encoders.items()}

    def dataset(self, task, split: str, shared: bool | None = None) -> EncodedTaskDataset:
        """A split's samples and features. `shared`: every process opens it at this point together, so a
        missing feature store is encoded by all of them (default: the first time this process opens the split;
        a split reopened after its release is read alone)."""
        key = (task.name, split)
        if key not in self._datasets:
            data = self.config.data
            limit = data.max_train_samples if split == "train" else data.max_eval_samples
            samples = load_task_split(self.root, task.name, split, limit)
            media = [dict(media_streams(s)) for s in samples]
            store_dtype = STORE_DTYPES[self.config.model.feature_dtype or self.config.model.dtype]
            streams = {}
            for stream in STREAMS[task.modality]:  # a video with its sound: the video, then its audio
                paths = [str(self.root / m[stream]) for m in media]
                with plain_model_loading(), _rng_untouched():  # an encoder loads (whole) on first use
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

    def release(self) -> None:
        """After a step: drops the training and validation data of the tasks learned so far (this step's, and
        past tasks' reopened by replay). Their features stay on disk: a method that keeps a memory of a task
        reopens it through `dataset_fn` without encoding anything. The evaluation split stays (it is scored
        after every later step)."""
        for key in [k for k in self._datasets if k[1] in ("train", "val") and k[1] != self.config.data.eval_split]:
            del self._datasets[key]
