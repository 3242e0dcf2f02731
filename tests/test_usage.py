"""What a step costs (micl/training/usage.py, micl/evaluation/efficiency.py): the bytes a phase keeps beyond the
adapter and projectors, the peak-RSS window, and the run's summary of its steps."""

import sys

import numpy as np
import pytest
import torch

from micl.evaluation.efficiency import efficiency_summary, scaled
from micl.training import usage


def test_extra_storage_counts_what_a_method_keeps_beyond_the_adapter_and_projectors(tmp_path):
    phase = tmp_path / "step_0_a"
    (phase / "adapter").mkdir(parents=True)
    for name, size in (("adapter/adapter_model.safetensors", 5000), ("projectors.safetensors", 3000),
                       ("micl_model.json", 100), ("metrics.json", 100), ("predictions.jsonl", 700)):
        (phase / name).write_bytes(b"x" * size)
    assert usage.extra_storage_bytes(phase) == 0
    torch.save([{"fisher": torch.zeros(1000)}], phase / "method_state.pt")
    (phase / "base_updates.safetensors").write_bytes(b"x" * 1234)
    (phase / "memory").mkdir()
    (phase / "memory" / "buffer.bin").write_bytes(b"x" * 10)
    expected = (phase / "method_state.pt").stat().st_size + 1234 + 10
    assert usage.extra_storage_bytes(phase) == expected and expected > 4000  # the 1000 float32s of "fisher"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak RSS is reset through /proc")
def test_the_peak_rss_window_restarts_at_each_reset():
    assert usage.reset_peak_rss()
    block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
    high = usage.peak_rss_bytes()
    del block
    assert usage.reset_peak_rss()
    low = usage.peak_rss_bytes()
    assert high - low > 150 * 2**20, (high, low)


def test_efficiency_summary_of_the_steps():
    steps = [{"trainable_params": 10, "extra_storage_bytes": 0, "peak_rss_bytes": 5, "train_runtime_s": 2.0,
              "eval_runtime_s": 1.0},
             {"trainable_params": 8, "extra_storage_bytes": 2**20, "peak_rss_bytes": 7, "train_runtime_s": 4.0,
              "eval_runtime_s": 1.5}]
    summary = efficiency_summary(steps)
    assert summary == {"trainable_params": 10, "extra_storage_bytes": 2**20, "peak_rss_bytes": 7, "train_s": 6.0,
                       "eval_s": 2.5, "wall_time_s": 8.5}
    assert scaled(summary, "extra_storage_bytes") == 1.0 and scaled(summary, "wall_time_s") == pytest.approx(8.5 / 60)
    old = [{"train_runtime_s": 2.0, "step_runtime_s": 3.0}]  # a step of a micl that did not measure the rest
    assert efficiency_summary(old) == {"trainable_params": None, "extra_storage_bytes": None, "peak_rss_bytes": None,
                                       "train_s": 2.0, "eval_s": None, "wall_time_s": None}
