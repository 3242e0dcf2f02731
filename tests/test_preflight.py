"""The preflight (micl/preflight.py): bad recipes, files and launches are refused by `micl train` with exit
code 2 and one line naming the key or the file, before any model is loaded and before anything is written.

Most runs here use the repository's recipe with its embedded model names: the preflight only looks at their
form, and `no_loading` fails a test that gets as far as building a model or an encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, tiny_recipe_overrides
from micl.cli import main
from micl.config import load_recipe
from micl.errors import DataError
from micl.preflight import preflight

RECIPE = str(REPO / "recipes" / "finetune.yaml")
ZERO3_JSON = str(REPO / "recipes" / "deepspeed" / "zero3.json")


@pytest.fixture
def no_loading(monkeypatch, tmp_path):
    """Starting processes, the process group, or building the LLM or the encoders fails the test; the feature
    cache is a fresh folder."""
    import micl.launch as launch
    import micl.training.loop as loop
    import micl.training.model_factory as model_factory
    import micl.training.task_data as task_data

    def tripwire(what):
        def reached(*args, **kwargs):
            raise AssertionError(f"{what} before the error")
        return reached

    monkeypatch.setattr(launch, "launch_command", tripwire("processes were launched"))
    monkeypatch.setattr(loop, "init_distributed", tripwire("the run started"))
    monkeypatch.setattr(model_factory, "load_llm", tripwire("the LLM was loaded"))
    monkeypatch.setattr(task_data, "build_encoders", tripwire("the encoders were built"))
    monkeypatch.setenv("MICL_CACHE_DIR", str(tmp_path / "cache"))
    for key in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "MICL_LAUNCHED", "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)


def base(tmp_path) -> list[str]:
    return [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", "order=[synth_image_qa]"]


def refused(capsys, tmp_path, *argv, recipe: str = RECIPE) -> str:
    """`micl train RECIPE <base> ARGV`: exit code 2, nothing on stdout but a launch line never, one line on
    stderr, nothing written (run folder, data root, feature cache). Returns the error line."""
    capsys.readouterr()
    rc = main(["train", recipe, *base(tmp_path), *argv])
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert "launching" not in captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("micl: error: "), captured.err
    for written in ("run", "cache"):
        assert not (tmp_path / written).exists(), written
    return lines[0]


# ---- values: lr scheduler, optimizer, tuner keys ------------------------------------------------------------
def test_bad_lr_scheduler_and_optimizer(no_loading, tmp_path, capsys):
    line = refused(capsys, tmp_path, "train.lr_scheduler=cosinus")
    assert "'train.lr_scheduler' must be one of linear, cosine," in line and "got 'cosinus'" in line
    line = refused(capsys, tmp_path, "train.lr_scheduler=reduce_lr_on_plateau")
    assert "'train.lr_scheduler' 'reduce_lr_on_plateau' needs settings micl does not pass" in line
    line = refused(capsys, tmp_path, "train.optim=adamw_fast")
    assert "'train.optim' must be an optimizer name of transformers, got 'adamw_fast'" in line


@pytest.mark.parametrize("overrides, key, tuner", [
    (["lora.num_experts=4"], "lora.num_experts", "moe_lora"),
    (["lora.num_experts=10"], "lora.num_experts", "moe_lora"),  # the default value, but set: still refused
    (["lora.routing=sample"], "lora.routing", "moe_lora"),
    (["lora.type=moe_lora", "lora.gate_init=0.5"], "lora.gate_init", "gated_lora"),
    (["lora.type=gated_lora", "lora.top_k=2"], "lora.top_k", "moe_lora"),
])
def test_a_key_of_another_tuner_is_refused(no_loading, tmp_path, capsys, overrides, key, tuner):
    line = refused(capsys, tmp_path, *overrides)
    assert f"'{key}' is a setting of lora.type {tuner}, but lora.type is" in line


def test_a_key_of_another_tuner_in_the_recipe_file(no_loading, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: finetune\nlora:\n  type: gated_lora\n  gate_init: 0.5\n  num_experts: 10\n")
    line = refused(capsys, tmp_path, recipe=str(recipe))
    assert f"{recipe}: 'lora.num_experts' is a setting of lora.type moe_lora, but lora.type is gated_lora" in line
    # the same keys under their own tuner pass (nothing is loaded: the preflight alone)
    for overrides in (["lora.type=moe_lora", "lora.num_experts=4", "lora.top_k=2", "lora.routing=sample"],
                      ["lora.type=gated_lora", "lora.gate_init=0.3"]):
        preflight(load_recipe(RECIPE, [*base(tmp_path), *overrides]), RECIPE)


def test_the_tuners_own_ranges(no_loading, tmp_path, capsys):
    line = refused(capsys, tmp_path, "lora.type=moe_lora", "lora.num_experts=4", "lora.top_k=5")
    assert "'lora.top_k' must be an integer between 1 and lora.num_experts (4), got 5" in line
    line = refused(capsys, tmp_path, "lora.type=gated_lora", "lora.gate_init=2.0")
    assert "'lora.gate_init' must be in (0, 2)" in line


# ---- methods, launcher, ZeRO-3 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["method=ewc"], "method ewc is not supported under DeepSpeed ZeRO-3"),
    (["method=replay"], "method replay is not supported under DeepSpeed ZeRO-3"),
    (["method=harmony", "lora.type=gated_lora"], "method harmony is not supported under DeepSpeed ZeRO-3"),
    (["train.early_stopping_patience=2"], "'train.early_stopping_patience' is not supported under DeepSpeed ZeRO-3"),
])
def test_zero3_refusals_before_launching(no_loading, tmp_path, capsys, overrides, expected):
    """`launch.config=zero3`: the command a user typed refuses before it starts any process."""
    assert expected in refused(capsys, tmp_path, "launch.config=zero3", *overrides)


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_methods_that_change_gradients_are_refused_under_deepspeed_before_launching(no_loading, tmp_path, capsys,
                                                                                    config):
    line = refused(capsys, tmp_path, f"launch.config={config}", "method=agem")
    assert "method agem is not supported under DeepSpeed" in line


@pytest.mark.parametrize("stage_env", [{"ACCELERATE_DEEPSPEED_CONFIG_FILE": ZERO3_JSON},
                                       {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}])
def test_zero3_refusals_under_a_launcher(no_loading, tmp_path, capsys, monkeypatch, stage_env):
    """A process of `accelerate launch --config_file zero3.yaml` (the environment it sets): the run refuses
    first thing, before the process group, the data and any evaluation."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for key, value in stage_env.items():
        monkeypatch.setenv(key, value)
    line = refused(capsys, tmp_path, "method=[finetune,ewc]")
    assert "method ewc is not supported under DeepSpeed ZeRO-3" in line
    line = refused(capsys, tmp_path, "method=harmony", "lora.type=gated_lora")
    assert "method harmony is not supported under DeepSpeed ZeRO-3" in line
    line = refused(capsys, tmp_path, "train.early_stopping_patience=1")
    assert "'train.early_stopping_patience' is not supported under DeepSpeed ZeRO-3" in line
    assert not (tmp_path / "data").exists()  # the synthetic data is not generated either


def test_zero_stage_of_the_launch_configs():
    from micl.launch import resolved_config, zero_stage

    stages = {name: zero_stage(resolved_config(name, "recipe")[1]) for name in ("cpu", "ddp", "zero2", "zero3",
                                                                              "zero3_offload")}
    assert stages == {"cpu": None, "ddp": None, "zero2": 2, "zero3": 3, "zero3_offload": 3}
    # an accelerate config with its DeepSpeed settings inline (no JSON)
    assert zero_stage({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3}}) == 3


def test_zero3_launch_section_of_a_recipe_file(no_loading, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: replay\nlaunch:\n  config: zero3\n  num_processes: 2\n")
    line = refused(capsys, tmp_path, recipe=str(recipe))
    assert line.startswith(f"micl: error: {recipe}: method replay is not supported under DeepSpeed ZeRO-3")


@pytest.mark.parametrize("overrides, expected", [
    (["method=harmony"], "method 'harmony' needs 'lora.type: gated_lora', got 'lora.type: lora'"),
    (["method=[harmony,adaptive_fusion]", "lora.type=gated_lora"], "each installs a media modulator"),
    (["method=sgd"], "unknown method 'sgd'"),
    (["method_args.lwf.alpha=1"], "'method_args.lwf' given but 'lwf' is not in 'method'"),
])
def test_method_capabilities_are_checked_before_launching(no_loading, tmp_path, capsys, overrides, expected):
    assert expected in refused(capsys, tmp_path, "launch.config=cpu", *overrides)


# ---- Hub repo, output_dir, YAML ------------------------------------------------------------------------------
def test_hub_repo_needs_owner_and_name(no_loading, tmp_path, capsys):
    line = refused(capsys, tmp_path, "push_to_hub=true", "hub_repo=justname")
    assert "'hub_repo' must look like OWNER/NAME" in line and "'justname'" in line
    run = tmp_path / "finished"
    run.mkdir()
    assert main(["push", str(run), "--repo", "justname"]) == 2
    assert capsys.readouterr().err.splitlines() == ["micl: error: --repo 'justname': expected OWNER/NAME (letters, "
                                                    "digits, '.', '_', '-')"]


def test_push_to_hub_needs_a_token(no_loading, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    line = refused(capsys, tmp_path, "push_to_hub=true", "hub_repo=me/run")
    assert "'push_to_hub' needs a Hugging Face token" in line


def test_output_dir_that_is_a_file(no_loading, tmp_path, capsys):
    file = tmp_path / "run.txt"
    file.write_text("not a folder")
    line = refused(capsys, tmp_path, f"output_dir={file}")
    assert f"'output_dir' '{file}' is a file; expected a folder" in line
    line = refused(capsys, tmp_path, f"output_dir={file / 'run'}")
    assert f"cannot be created: {file} is a file" in line
    assert file.read_text() == "not a folder"


@pytest.mark.parametrize("text, where", [
    ("train:\n  epochs: 3\n lr: 0.1\n", "line 3, column 2"),
    ("order: [a, b\nseed: 1\n", "line 2, column 5"),
    ('method: "finetune\n', "line 2, column 1"),
])
def test_malformed_yaml_is_one_line(no_loading, tmp_path, capsys, text, where):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    line = refused(capsys, tmp_path, recipe=str(recipe))
    assert line.startswith(f"micl: error: {recipe}: not valid YAML: {where}: ")
    line = refused(capsys, tmp_path, "order=[a, b")
    assert "override 'order=[a, b': cannot parse the value: line 1, column" in line


# ---- model names and folders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override, expected", [
    ("model.llm=./models/nope", "'model.llm': the local folder './models/nope' does not exist"),
    ("model.llm=/nowhere/llm", "'model.llm': the local folder '/nowhere/llm' does not exist"),
    ("model.llm=models/llm/v2", "'model.llm': the local folder 'models/llm/v2' does not exist"),
    ("model.llm=~/no-such-llm-folder", "'model.llm': the local folder"),
    ("model.llm=smollm", "'model.llm' must be an embedded name (smollm2-135m-instruct, "),
    ("model.image_encoder=clip", "'model.image_encoder' must be an embedded name (efficientnet-lite0), a local "
                                 "folder or a Hub id OWNER/NAME, got 'clip'"),
    ("model.video_encoder=../frames", "'model.video_encoder': the local folder '../frames' does not exist"),
    ("model.audio_encoder=whisper", "'model.audio_encoder' must be an embedded name (whisper-tiny.en)"),
])
def test_model_names_and_local_folders(no_loading, tmp_path, capsys, override, expected):
    assert expected in refused(capsys, tmp_path, override)


def test_accepted_model_forms_load_nothing(no_loading, tmp_path):
    folder = tmp_path / "encoder"
    folder.mkdir()
    config = load_recipe(RECIPE, [*base(tmp_path), "model.llm=HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "model.image_encoder=openai/clip-vit-base-patch32", f"model.video_encoder={folder}",
                                  "model.audio_encoder=whisper-tiny.en"])
    preflight(config, RECIPE)


def test_home_in_a_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "llm").mkdir()
    config = load_recipe(RECIPE, ["model.llm=~/llm", "output_dir=~/run"])
    assert (config.model.llm, config.output_dir) == (str(tmp_path / "llm"), str(tmp_path / "run"))
    preflight(config, RECIPE)


# ---- task files and media paths ------------------------------------------------------------------------------
def _row(i: int, media: str) -> dict:
    return {"id": f"q{i}", "task": "okvqa", "modality": "image", "task_type": "qa", "media": media,
            "instruction": "what is it?", "target": "a square", "references": ["a square"]}


def write_okvqa(root: Path, splits=("train", "val", "test"), media=None, images: int = 3) -> None:
    """A small okvqa dataset under `root` (real PNG images; `media` replaces the path of the last row)."""
    from PIL import Image

    (root / "okvqa").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(root / "okvqa" / f"img{i}.png")
    for split in splits:
        rows = [_row(i, f"okvqa/img{i}.png") for i in range(images)]
        if media is not None:
            rows[-1]["media"] = media
        (root / "okvqa" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_missing_task_files_name_the_file_and_the_command(no_loading, tmp_path, capsys):
    data = tmp_path / "data"
    line = refused(capsys, tmp_path, "order=[okvqa]")
    assert line == (f"micl: error: {data / 'okvqa' / 'train.jsonl'}: not found (split train of task okvqa, data.root "
                    f"{data}); `micl data prepare okvqa --root <the downloaded okvqa dataset> --out {data}` writes it "
                    f"(docs/reproducing_moincl.md)")
    write_okvqa(data, splits=("train", "test"))
    line = refused(capsys, tmp_path, "order=[okvqa]", "train.early_stopping_patience=1")  # early stopping reads val
    assert f"{data / 'okvqa' / 'val.jsonl'}: not found" in line
    line = refused(capsys, tmp_path, "order=[okvqa]", "data.eval_split=val")
    assert f"{data / 'okvqa' / 'val.jsonl'}: not found" in line
    (data / "okvqa" / "val.jsonl").write_text("")
    line = refused(capsys, tmp_path, "order=[okvqa]", "train.early_stopping_patience=1")
    assert f"{data / 'okvqa' / 'val.jsonl'}: no samples" in line
    preflight(load_recipe(RECIPE, [*base(tmp_path), "order=[okvqa]"]), RECIPE)  # train + test are enough


def test_synthetic_splits_the_run_reads_are_not_empty(no_loading, tmp_path, capsys):
    line = refused(capsys, tmp_path, "data.synth_val=0", "train.early_stopping_patience=1")
    assert "'data.synth_val' must be >= 1: the run reads split val of synth_image_qa" in line
    preflight(load_recipe(RECIPE, [*base(tmp_path), "data.synth_val=0"]), RECIPE)  # val is not read


def test_a_missing_split_file_names_the_command_that_writes_it(tmp_path):
    from micl.data.tasks import load_task_split

    with pytest.raises(DataError, match=r"`micl data prepare okvqa --root .* --out "):
        load_task_split(tmp_path, "okvqa", "train")
    with pytest.raises(DataError, match=r"`micl data synth --out "):
        load_task_split(tmp_path, "synth_image_qa", "train")


@pytest.mark.parametrize("media", ["../../../../etc/hostname", "/etc/hostname", "okvqa/../../secret.png"])
def test_a_media_path_that_leaves_the_data_root(no_loading, tmp_path, capsys, media):
    from micl.data.tasks import load_task_split

    data = tmp_path / "data"
    write_okvqa(data, media=media)
    line = refused(capsys, tmp_path, "order=[okvqa]")
    assert line == (f"micl: error: {data / 'okvqa' / 'train.jsonl'}:3: row id='q2': media path {media!r} leaves the "
                    f"data root (media paths are relative to the data root and stay inside it)")
    with pytest.raises(DataError, match=f"test.jsonl:3: row id='q2': media path {media!r} leaves the data root"):
        load_task_split(data, "okvqa", "test")  # where the run reads its samples


# ---- the error line after a progress bar ---------------------------------------------------------------------
def test_an_error_under_a_progress_bar_starts_its_own_line(tiny_models, tmp_path, capsys, monkeypatch):
    """A real run whose first evaluation encodes a test split with an undecodable image: the encoding bar is
    drawn when the error is raised, and the error line still starts a line of its own."""
    monkeypatch.setenv("MICL_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_okvqa(data)
    (data / "okvqa" / "img1.png").write_bytes(b"these bytes are no image")
    overrides = [*tiny_recipe_overrides(tiny_models, data, tmp_path / "run"), "order=[okvqa]", "eval.batch_size=1"]
    capsys.readouterr()
    assert main(["train", RECIPE, *overrides, "model.encoder_batch_size=1"]) == 2
    err = capsys.readouterr().err
    assert "encoding okvqa/test (image)" in err  # the bar was drawn
    lines = err.split("\n")  # as a log file or a pipe keeps it (a carriage return does not end a line there)
    errors = [line for line in lines if "micl: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("micl: error: ")
    assert f"{data / 'okvqa' / 'img1.png'}: cannot decode image" in errors[0]


def test_a_live_progress_bar_is_ended_before_the_error_line(tmp_path, capsys):
    """A bar still open when the error reaches the CLI (e.g. the Trainer's, interrupted) is closed first."""
    from tqdm.auto import tqdm

    bar = tqdm(total=10, desc="training")
    bar.update(3)
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "training" in err and bar.disable  # drawn, then closed by the CLI
    assert [line for line in err.split("\n") if "micl: error:" in line][0].startswith("micl: error: ")


def test_an_owner_less_hub_name_in_the_cache_is_accepted(no_loading, tmp_path, monkeypatch):
    """`gpt2`, `bert-base-uncased`: Hub names without an owner, accepted when the Hugging Face cache has them."""
    from micl.preflight import in_hub_cache

    cache = tmp_path / "hf"
    snapshot = cache / "models--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--gpt2" / "refs").mkdir()
    (cache / "models--gpt2" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert in_hub_cache("gpt2") and not in_hub_cache("smollm") and not in_hub_cache("a/b")
