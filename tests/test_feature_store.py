"""The feature store (micl/modeling/feature_store.py): one file per split and stream, each media item once, in the
store dtype bit for bit, read lazily (RSS bounded), never used half-written, reused by later runs, shared out
between two processes; and a run that releases its finished tasks' data and reopens it without encoding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import REPO, tiny_recipe_overrides
from micl.config import load_recipe
from micl.errors import MiclError
from micl.modeling.encoders.synthetic import SyntheticEncoder
from micl.modeling.feature_store import DATA, META, PARTIAL, FeatureStore, FeatureStores, SampleFeatures, is_complete
from test_distributed import _env, _free_port


def write_media(folder: Path, count: int, size: int = 64) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"item{i:04d}.bin"
        path.write_bytes(i.to_bytes(4, "little") * (size // 4))
        paths.append(str(path))
    return paths


def encoder(tokens=4, dim=8, batch_size=3) -> SyntheticEncoder:
    enc = SyntheticEncoder("image", tokens=tokens, dim=dim)
    enc.batch_size = batch_size
    return enc


def expected(enc: SyntheticEncoder, paths: list[str], dtype: torch.dtype) -> torch.Tensor:
    return enc.encode([enc.load(p) for p in paths]).to(dtype)


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar")


def test_rows_sharing_a_media_item_share_one_stored_item(tmp_path):
    one, two = write_media(tmp_path / "media", 2)
    copy = tmp_path / "media" / "copy_of_one.bin"  # same content, another path
    copy.write_bytes(Path(one).read_bytes())
    paths = [one] * 5 + [two] * 4 + [str(copy)]  # an image with 5 captions, another with 4, a copy of the first
    stores = FeatureStores(tmp_path / "cache")
    features = stores.features(encoder(), paths)
    assert len(features) == 10 and len(features.store) == 2 and stores.encoded == 2
    assert features.index.tolist() == [0] * 5 + [1] * 4 + [0]
    assert (features.store.folder / DATA).stat().st_size == 2 * 4 * 8 * 4
    rows = [features[i] for i in range(10)]
    assert all(torch.equal(rows[0], r) for r in rows[1:5] + rows[9:])
    assert not torch.equal(rows[0], rows[5])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_store_dtype_round_trips_bit_exactly(tmp_path, dtype):
    paths = write_media(tmp_path / "media", 7)
    enc = encoder()
    features = FeatureStores(tmp_path / "cache").features(enc, paths, dtype)
    stored = torch.stack([features[i] for i in range(7)])
    assert stored.dtype == dtype and features.store.meta["dtype"] == str(dtype).removeprefix("torch.")
    words = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(stored.view(words), expected(enc, paths, dtype).view(words))
    assert (features.store.folder / DATA).stat().st_size == 7 * 4 * 8 * dtype.itemsize


def test_opening_reads_nothing_and_reading_every_item_keeps_rss_bounded(tmp_path):
    paths = write_media(tmp_path / "media", 200)
    enc = encoder(tokens=256, dim=1024, batch_size=16)  # 1 MiB per float32 item: a 200 MiB store
    FeatureStores(tmp_path / "cache").features(enc, paths)
    rss, read = current_rss(), bytes_read()
    features = FeatureStores(tmp_path / "cache").features(enc, paths)
    assert bytes_read() - read < (1 << 20)  # the media files' digests are not hashed here: they are tiny
    assert current_rss() - rss < (8 << 20)
    checksum = 0.0
    for i in range(len(features)):
        checksum += float(features[i][0, 0])
    assert bytes_read() - read >= 200 << 20  # every item was read ...
    assert current_rss() - rss < (50 << 20)  # ... and none stayed in memory


def test_forked_dataloader_workers_read_the_store(tmp_path):
    paths = write_media(tmp_path / "media", 6)
    features = SampleFeatures({"image": FeatureStores(tmp_path / "cache").features(encoder(), paths * 2)}, 12)
    features[0]  # the parent's descriptor is open before the fork
    loader = DataLoader(features, batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert all(torch.equal(got["image"], features[i]["image"]) for i, got in enumerate(loader))


KILLED_BUILD = """
import os, signal, sys
from micl.modeling.encoders.synthetic import SyntheticEncoder
from micl.modeling.feature_store import FeatureStores

class Dying(SyntheticEncoder):
    calls = 0
    def encode(self, items):
        Dying.calls += 1
        if Dying.calls == 2:  # the first batch is already written
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode(items)

encoder = Dying("image", tokens=4, dim=8)
encoder.batch_size = 3
FeatureStores(sys.argv[1]).features(encoder, sys.argv[2:])
"""


def test_a_killed_build_is_never_read_and_is_rebuilt(tmp_path):
    paths = write_media(tmp_path / "media", 8)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(cache), *paths], env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL
    (folder,) = [p for p in cache.iterdir()]
    assert (folder / PARTIAL).is_file() and not (folder / META).exists() and not is_complete(folder)
    with pytest.raises(MiclError, match="not a complete feature store"):
        FeatureStore(folder)
    stores = FeatureStores(cache)
    features = stores.features(encoder(), paths)  # the lock died with the killed process
    assert stores.encoded == 8 and stores.built == 1 and features.store.folder == folder
    assert torch.equal(torch.stack([features[i] for i in range(8)]), expected(encoder(), paths, torch.float32))
    assert not (folder / PARTIAL).exists()


def test_a_store_whose_data_file_is_cut_short_is_rebuilt(tmp_path):
    paths = write_media(tmp_path / "media", 4)
    first = FeatureStores(tmp_path / "cache").features(encoder(), paths)
    data = first.store.folder / DATA
    data.write_bytes(data.read_bytes()[:-4])
    stores = FeatureStores(tmp_path / "cache")
    again = stores.features(encoder(), paths)
    assert stores.encoded == 4 and torch.equal(again[3], expected(encoder(), paths, torch.float32)[3])


def test_two_processes_encode_disjoint_halves_into_the_one_process_store(tmp_path):
    paths = write_media(tmp_path / "media", 9)
    rows = paths + paths[:3]  # 12 rows, 9 items
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "feature_store_worker.py"), str(out), str(tmp_path / "shared"), *rows]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["local_rank"] for r in ranks] == [0, 1] and {r["local_world_size"] for r in ranks} == {2}
    halves = [set(r["loaded"]) for r in ranks]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(paths)
    assert sorted(len(h) for h in halves) == [4, 5] and [r["encoded"] for r in ranks] in ([4, 5], [5, 4])
    assert [r["built"] for r in ranks] == [1, 0]  # the machine's first process completes the store
    assert ranks[0]["rows"] == ranks[1]["rows"]

    single = FeatureStores(tmp_path / "single").features(encoder(batch_size=64), rows, torch.bfloat16)
    shared = Path(ranks[0]["folder"])
    assert shared.name == single.store.folder.name  # the same key
    assert (shared / DATA).read_bytes() == (single.store.folder / DATA).read_bytes()
    assert json.loads((shared / META).read_text()) == single.store.meta
    assert ranks[0]["index"] == single.index.tolist()


def test_a_run_releases_finished_tasks_and_reopens_them_without_encoding(tiny_models, synth_root, tmp_path,
                                                                         monkeypatch):
    from micl.training.loop import ContinualRun

    monkeypatch.setenv("MICL_CACHE_DIR", str(tmp_path / "cache"))
    tasks = ["synth_image_caption", "synth_image_qa"]
    overrides = [*tiny_recipe_overrides(tiny_models, synth_root, tmp_path / "run"), f"order=[{','.join(tasks)}]",
                 "method=replay", "method_args.replay.replay_batch_size=2", "eval.forward_transfer=false"]
    run = ContinualRun(load_recipe(REPO / "recipes" / "finetune.yaml", overrides))
    requested = []
    opened = run.dataset
    run.dataset = lambda task, split, **kw: requested.append((task.name, split)) or opened(task, split, **kw)
    run.run()
    assert all(split == "test" for _, split in run.data._datasets)  # training data released after each step
    step_1 = requested.index(("synth_image_qa", "train"))
    assert ("synth_image_caption", "train") in requested[step_1:]  # replay reopened the released task
    stores = sorted(p.name for p in (tmp_path / "cache" / "feature_store").iterdir() if p.is_dir())
    assert run.feature_stores.built == len(stores) == 4  # 2 tasks x (train, test), each built once

    again = ContinualRun(load_recipe(REPO / "recipes" / "finetune.yaml", overrides))
    for name in tasks:
        for split in ("train", "test"):
            dataset = again.dataset(next(t for t in again.tasks if t.name == name), split)
            first = dataset.features[0]["image"]
            assert first.shape == (4, 32)
    assert again.feature_stores.encoded == 0
