"""The suite never writes into the user's micl cache (~/.cache/micl): MICL_CACHE_DIR points into pytest's temporary
folder of this session (the `micl_cache` fixture of conftest.py), for this process and the processes tests start,
and so do the two things written there: the converted embedded LLM and a run's feature stores."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO, tiny_recipe_overrides
from micl.config import load_recipe
from micl.modeling.llm import cache_root
from test_distributed import _env


def test_the_micl_cache_is_the_sessions_temporary_folder(micl_cache, tmp_path_factory, embedded_llm_dir, tiny_models,
                                                         synth_root, tmp_path):
    from micl.training.loop import ContinualRun

    session = tmp_path_factory.getbasetemp().resolve()
    assert cache_root().resolve() == micl_cache.resolve() and micl_cache.resolve().is_relative_to(session)
    assert embedded_llm_dir.resolve().is_relative_to(micl_cache.resolve())

    run = ContinualRun(load_recipe(REPO / "recipes" / "finetune.yaml",
                                   tiny_recipe_overrides(tiny_models, synth_root, tmp_path / "run")))
    assert run.feature_stores.root.resolve().is_relative_to(micl_cache.resolve())

    # what the launched processes of the distributed and launch tests get (cache_root() reads only this variable)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['MICL_CACHE_DIR'])"],
                           env=_env(), capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-2000:]
    assert Path(child.stdout.strip()).resolve() == micl_cache.resolve()
