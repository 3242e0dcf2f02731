"""Worker of tests/test_feature_store.py under torchrun (CPU, gloo): every process builds the same shared feature
store with the synthetic encoder; each writes <out>/rank<r>.json with the media it encoded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from micl.modeling.encoders.synthetic import SyntheticEncoder
from micl.modeling.feature_store import FeatureStores
from micl.utils.distributed import init_distributed, local_rank, local_world_size


class RecordingEncoder(SyntheticEncoder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaded: list[str] = []

    def load(self, path):
        self.loaded.append(path)
        return super().load(path)


def main() -> None:
    out, cache, *paths = sys.argv[1:]
    torch.set_num_threads(1)
    init_distributed()
    encoder = RecordingEncoder("image", tokens=4, dim=8)
    encoder.batch_size = 2
    stores = FeatureStores(cache)
    features = stores.features(encoder, paths, torch.bfloat16)
    record = {"local_rank": local_rank(), "local_world_size": local_world_size(), "loaded": sorted(encoder.loaded),
              "encoded": stores.encoded, "built": stores.built, "folder": str(features.store.folder),
              "index": features.index.tolist(),
              "rows": [features[i].view(torch.int16).tolist() for i in range(len(features))]}
    Path(out, f"rank{local_rank()}.json").write_text(json.dumps(record))
    # leave together: a process that exits while the other still talks to it over gloo can abort at exit
    # ("terminate called without an active exception")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
