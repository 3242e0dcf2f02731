"""micl's data files exist once, in the top-level folders of the layout (micl/utils/resources.py): a source
checkout reads them there and a built wheel carries them as micl.resources.<folder>."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO
from micl.utils.resources import RESOURCE_FOLDERS, find_resource, resource_dir, resource_names


def _layout_files() -> dict[str, Path]:
    """`folder/name` -> file, for every file of the resource folders of the checkout."""
    return {f"{folder}/{p.name}": p for folder in RESOURCE_FOLDERS for p in sorted((REPO / folder).iterdir())
            if p.is_file()}


def test_resources_resolve_to_the_top_level_files_in_a_checkout():
    files = _layout_files()
    assert {"prompts/templates.yaml", "eval/orders.yaml", "eval/tasks.yaml", "recipes/accelerate/zero2.yaml",
            "recipes/deepspeed/zero2.json"} <= set(files)
    for relative, path in files.items():
        assert find_resource(relative) == path
    assert resource_dir("recipes/accelerate") == REPO / "recipes" / "accelerate"
    assert resource_names("recipes/deepspeed", ".json") == ["zero2", "zero3", "zero3_offload"]
    assert not (REPO / "micl" / "resources").exists()  # no packaged twin in the source tree


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of this checkout, built from a copy of its sources (the checkout stays clean)."""
    src = _mkdir(tmp_path / "src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for top in sorted({folder.split("/")[0] for folder in RESOURCE_FOLDERS} | {"micl"}):
        shutil.copytree(REPO / top, src / top, ignore=ignore)
    out = tmp_path / "wheel"
    # without build isolation when this environment's setuptools builds wheels itself (>= 70.1), else pip
    # fetches a build environment from the index
    offline = importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out),
           *(["--no-build-isolation"] if offline else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = out.glob("micl-*.whl")
    return wheel


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_built_wheel_carries_every_resource_once_and_reads_it_outside_the_repository(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {n[len("micl/resources/"):]: n for n in names if n.startswith("micl/resources/")}
    layout = _layout_files()
    assert set(packaged) == set(layout)  # every file of the layout, and nothing else
    for relative, path in layout.items():
        assert zipfile.ZipFile(wheel).read(packaged[relative]) == path.read_bytes(), relative
    assert not [n for n in names if n.startswith(tuple(f"{top}/" for top in ("prompts", "eval", "recipes")))]

    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    script = """
import json, micl
from micl.data.orders import resolve_order
from micl.data.prompts import default_templates_path, load_templates
from micl.data.tasks import get_task
from micl.launch import builtin_configs, resolved_config
path, settings, _ = resolved_config("zero2", "recipe.yaml")
print(json.dumps({"micl": micl.__file__, "templates": str(default_templates_path()), "accelerate": str(path),
                  "deepspeed": settings["deepspeed_config"]["deepspeed_config_file"], "configs": builtin_configs(),
                  "quick": resolve_order("quick"), "okvqa": get_task("okvqa").metric,
                  "caption": load_templates()["caption"]["image"]["eval"]}))
"""
    outside = _mkdir(tmp_path / "elsewhere")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(site), "HOME": str(outside)}
    done = subprocess.run([sys.executable, "-c", script], cwd=outside, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    resources = site / "micl" / "resources"
    assert Path(got["micl"]).parent == site / "micl"
    assert got["templates"] == str(resources / "prompts" / "templates.yaml")
    assert got["accelerate"] == str(resources / "recipes" / "accelerate" / "zero2.yaml")
    assert got["deepspeed"] == str(resources / "recipes" / "deepspeed" / "zero2.json")
    assert got["configs"] == resource_names("recipes/accelerate", ".yaml")
    assert got["quick"] == ["synth_image_caption", "synth_audio_qa"] and got["okvqa"] == "vqa_accuracy"
    assert got["caption"] == "describe the {modality}."
