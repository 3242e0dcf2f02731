"""The process group uses the recipe's `train.ddp_timeout`: a collective that waits longer for another
rank fails after that many seconds (here 3 s) instead of the 30 minutes of the default."""

from __future__ import annotations

import subprocess
import sys
import time

from test_distributed import _env, _free_port
from conftest import REPO

SCRIPT = """
import os, sys, time
import torch
from micl.utils.distributed import init_distributed
init_distributed(float(sys.argv[1]))
rank = torch.distributed.get_rank()
if rank == 1:
    time.sleep(40)  # alone, long: the other rank waits for it in the barrier
started = time.time()
try:
    torch.distributed.barrier()
except Exception as err:
    print(f"rank {rank} timed out after {time.time() - started:.1f} s: {type(err).__name__}", flush=True)
    os._exit(3)
print(f"rank {rank} passed the barrier", flush=True)
"""


def test_collectives_time_out_after_the_configured_seconds(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script), "3"]
    started = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.time() - started
    assert "rank 0 timed out after" in done.stdout, done.stdout + done.stderr[-3000:]
    waited = float(done.stdout.split("rank 0 timed out after ")[1].split(" s")[0])
    assert 2.5 <= waited < 20
    assert elapsed < 100
