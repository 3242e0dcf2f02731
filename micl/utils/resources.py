"""micl's data files: `prompts/`, `eval/`, `recipes/accelerate/` and `recipes/deepspeed/` of the repository.

There is one copy of each, in those top-level folders. A built micl carries them as the packages
`micl.resources.<folder>` (setup.py maps each package onto its folder), so an installed micl reads the same
files through `importlib.resources`; a source checkout (an editable install included) reads them where they
are. Read them through `find_resource`: setuptools' editable finder does not map packages nested in a
namespace, so `importlib.resources.files("micl.resources.prompts")` works in an installed wheel only.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ConfigError

#: the folders of the layout that are packaged, as `micl.resources.<folder with dots>`
RESOURCE_FOLDERS = ("prompts", "eval", "recipes/accelerate", "recipes/deepspeed")

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _in_checkout() -> bool:
    # pyproject.toml marks a source checkout (an installed micl's parents[2] is site-packages, which has none)
    return (_REPO_ROOT / "pyproject.toml").is_file()


def resource_package(folder: str) -> str:
    """The package that carries `folder` (e.g. `recipes/accelerate` -> `micl.resources.recipes.accelerate`)."""
    if folder not in RESOURCE_FOLDERS:
        raise ConfigError(f"{folder!r} is not a resource folder of micl (valid: {', '.join(RESOURCE_FOLDERS)})")
    return "micl.resources." + folder.replace("/", ".")


def resource_dir(folder: str):
    """The folder (a `Path` in a checkout, else an `importlib.resources` Traversable)."""
    package = resource_package(folder)
    if _in_checkout():
        return _REPO_ROOT / folder
    try:
        return resources.files(package)
    except ModuleNotFoundError:
        raise ConfigError(f"{folder}/: not found in the repository ({_REPO_ROOT / folder}) nor in the installed "
                          f"package ({package}); reinstall micl") from None


def resource_names(folder: str, suffix: str) -> list[str]:
    """Sorted stems of the files of `folder` ending in `suffix` (e.g. the built-in accelerate configs)."""
    return sorted(p.name[: -len(suffix)] for p in resource_dir(folder).iterdir()
                  if p.is_file() and p.name.endswith(suffix))


def find_resource(relative: str) -> Path:
    """The file `relative` of the layout (e.g. `prompts/templates.yaml`), as a path on disk."""
    folder, _, name = relative.rpartition("/")
    path = resource_dir(folder) / name
    if not path.is_file():
        raise ConfigError(f"{relative}: not found in micl's resources ({path})")
    return Path(str(path))
