"""Methods of other packages: registered through the `micl.methods` entry-point group, usable by a recipe
through build_methods; a plugin whose import fails is reported only when a recipe asks for it."""

import textwrap

import pytest

from micl.config import load_recipe
from micl.errors import ConfigError
from micl.methods import METHODS, PLUGIN_ERRORS, build_methods, discover
from conftest import REPO

RECIPE = REPO / "recipes" / "finetune.yaml"


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A folder on sys.path where a test installs distributions (module + dist-info); the registry is
    restored afterwards."""
    methods, errors = dict(METHODS), dict(PLUGIN_ERRORS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    METHODS.clear(), METHODS.update(methods)
    PLUGIN_ERRORS.clear(), PLUGIN_ERRORS.update(errors)


def install(root, distribution: str, module: str, source: str, entry_points: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{distribution}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[micl.methods]\n{entry_points}\n")


PLUGIN = '''
    from dataclasses import dataclass

    from micl.methods.base import ContinualMethod
    from micl.methods.registry import register


    @dataclass
    class ScaledArgs:
        factor: float = 1.0


    @register
    class ScaledFinetune(ContinualMethod):
        name = "scaled_finetune"
        Args = ScaledArgs
'''


def test_a_method_of_another_package_is_found_through_its_entry_point(plugin_path):
    install(plugin_path, "micl_plugin_scaled", "micl_plugin_scaled", PLUGIN,
            "scaled_finetune = micl_plugin_scaled")
    assert "scaled_finetune" not in METHODS
    discover()
    assert METHODS["scaled_finetune"].__module__ == "micl_plugin_scaled"
    config = load_recipe(RECIPE, ["method=[finetune,scaled_finetune]", "method_args.scaled_finetune.factor=2.5"])
    finetune, scaled = build_methods(config, str(RECIPE))
    assert finetune.name == "finetune" and type(scaled).__name__ == "ScaledFinetune"
    assert scaled.args.factor == 2.5
    bad = load_recipe(RECIPE, ["method=scaled_finetune", "method_args.scaled_finetune.factr=2.5"])
    with pytest.raises(ConfigError, match="method_args.scaled_finetune.factr"):  # its settings checked strictly
        build_methods(bad, str(RECIPE))


def test_a_broken_plugin_is_reported_only_when_a_recipe_asks_for_it(plugin_path):
    install(plugin_path, "micl_plugin_broken", "micl_plugin_broken", "import a_module_that_is_not_installed\n",
            "broken_method = micl_plugin_broken")
    discover()  # does not raise: micl's own methods stay usable
    assert "broken_method" in PLUGIN_ERRORS and "broken_method" not in METHODS
    assert [m.name for m in build_methods(load_recipe(RECIPE), str(RECIPE))] == ["finetune"]
    with pytest.raises(ConfigError) as err:
        build_methods(load_recipe(RECIPE, ["method=[finetune,broken_method]"]), str(RECIPE))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{RECIPE}: method 'broken_method'")
    assert "'micl_plugin_broken' failed to load" in message and "a_module_that_is_not_installed" in message
