import textwrap

import pytest

from micl.config import load_recipe
from micl.errors import ConfigError
from micl.methods import build_methods

REPO_RECIPE = "recipes/finetune.yaml"


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_repo_recipe_loads_with_overrides():
    config = load_recipe(REPO_RECIPE, ["train.epochs=2", "order=order2", "data.max_train_samples=null", "train.lr=1e-4"])
    assert config.train.epochs == 2
    assert config.order == "order2"
    assert config.data.max_train_samples is None
    assert config.train.lr == pytest.approx(1e-4)
    assert config.methods == ["finetune"]


def test_unknown_key_names_key_and_lists_valid_ones(tmp_path):
    path = write(tmp_path, """
        train:
          epoch: 3
    """)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "train.epoch" in message and "did you mean 'train.epochs'" in message
    assert "batch_size" in message and str(path) in message


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'ouput_dir'.*output_dir"):
        load_recipe(write(tmp_path, "ouput_dir: x\n"))


@pytest.mark.parametrize("override, key", [
    ("train.epochs=two", "train.epochs"),
    ("train.epochs=0", "train.epochs"),
    ("train.lr=-1", "train.lr"),
    ("lora.target_modules=q_proj", "lora.target_modules"),
    ("model.image_tokens=5", "model.image_tokens"),
    ("data.eval_split=dev", "data.eval_split"),
    ("data.max_eval_samples=0", "data.max_eval_samples"),
    ("seed=1.5", "seed"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(REPO_RECIPE, [override])


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_recipe(REPO_RECIPE, ["train.epochs"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_unknown_method_lists_valid_ones():
    config = load_recipe(REPO_RECIPE, ["method=sgd"])
    with pytest.raises(ConfigError, match="unknown method 'sgd'; valid: .*finetune"):
        build_methods(config)


def test_method_args_for_a_method_not_used():
    config = load_recipe(REPO_RECIPE, ["method_args.lwf.alpha=1"])
    with pytest.raises(ConfigError, match="method_args.lwf"):
        build_methods(config)
