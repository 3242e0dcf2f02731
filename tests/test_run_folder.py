"""The run folder (micl/run_folder.py): one layout for the loop, `micl push` and from_pretrained; run folders
written by an earlier micl still resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from micl.cli import main
from micl.errors import MiclError
from micl.run_folder import RunFolder, step_dir_name

REPO = Path(__file__).resolve().parents[1]
OLD_RUN = Path(__file__).parent / "fixtures" / "run_097b00c"  # tests/fixtures/make_old_run.py wrote it


def _old_run(tiny_models, synth_root, out: Path) -> list[str]:
    """The fixture's run folder at `out`, its recorded paths pointing at this session's tiny models and data;
    returns the `micl train` overrides it was made with."""
    subs = {"{LLM}": tiny_models["llm"], "{VIT}": tiny_models["vit"], "{WHISPER}": tiny_models["whisper"],
            "{DATA_ROOT}": str(synth_root), "{OUTPUT_DIR}": str(out)}
    shutil.copytree(OLD_RUN, out, ignore=shutil.ignore_patterns("expected_*"))
    for path in [out / "run_config.json", *out.glob("step_*/**/*.json")]:
        text = path.read_text()
        for placeholder, value in subs.items():
            text = text.replace(placeholder, value)
        path.write_text(text)
    args = json.loads((OLD_RUN / "expected_matrix.json").read_text())["args"]
    return [next((arg.replace(k, v) for k, v in subs.items() if k in arg), arg) for arg in args]


def test_a_run_folder_of_the_previous_release_resumes_and_ends_as_that_release_would(tiny_models, synth_root,
                                                                                   tmp_path, capsys, monkeypatch):
    # no feature store yet (a run resumed on another machine): the past task's features are encoded in the middle
    # of step 1, when replay first draws from it, and must not shift the training's random draws
    monkeypatch.setenv("MICL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "old_run"
    args = _old_run(tiny_models, synth_root, out)
    step_0 = out / step_dir_name(0, "synth_image_caption")
    before = (step_0 / "metrics.json").read_text()
    assert main(["train", str(REPO / "recipes" / "replay.yaml"), *args]) == 0
    assert "resuming after step 1/2" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["matrix"] == json.loads((OLD_RUN / "expected_matrix.json").read_text())["matrix"]
    assert (step_0 / "metrics.json").read_text() == before  # the finished phase is not retrained
    # step 1, trained by this release from the old phase and method state, equals the old release's
    step_1 = out / step_dir_name(1, "synth_audio_qa")
    for name, saved in (("projectors.safetensors", "projectors.safetensors"),
                        ("adapter_model.safetensors", "adapter/adapter_model.safetensors")):
        expected, got = load_file(str(OLD_RUN / "expected_step_1" / name)), load_file(str(step_1 / saved))
        assert expected.keys() == got.keys()
        assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected), name


def test_from_pretrained_takes_a_run_folder_and_loads_its_last_phase(tiny_models, synth_root, tmp_path):
    from micl.modeling.multimodal import MultimodalLM

    out = tmp_path / "old_run"
    _old_run(tiny_models, synth_root, out)
    model = MultimodalLM.from_pretrained(out)
    phase = load_file(str(out / step_dir_name(0, "synth_image_caption") / "projectors.safetensors"))
    assert all(torch.equal(model.projectors.state_dict()[k], v) for k, v in phase.items())
    with pytest.raises(MiclError, match="no finished step"):
        empty = tmp_path / "empty"
        empty.mkdir()
        shutil.copy(out / "run_config.json", empty / "run_config.json")
        MultimodalLM.from_pretrained(empty)


def test_finished_phases_stop_at_the_first_unfinished_step_and_a_failed_write_leaves_none(tmp_path):
    folder = RunFolder(tmp_path)
    (tmp_path / "run_config.json").write_text(json.dumps({"order": ["a", "b", "c"]}))

    def write(step):
        def fill(phase):
            (phase / "metrics.json").write_text(json.dumps({"step": step}))
        return fill

    folder.write_phase(0, "a", write(0))
    folder.write_phase(2, "c", write(2))  # no step 1: step 2 is not reached
    assert [p.step for p in folder.finished_phases()] == [0]
    assert folder.finished_records(["a", "b", "c"]) == [{"step": 0}]

    def crash(phase):
        (phase / "metrics.json").write_text("{}")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        folder.write_phase(1, "b", crash)
    assert not folder.phase_folder(1, "b").exists()
    with pytest.raises(MiclError, match="without adapter/adapter_config.json"):
        folder.finished_phases(complete=True)


def test_encoding_features_leaves_the_random_state_as_it_was(tiny_models, synth_root, tmp_path, monkeypatch):
    from micl.config import load_recipe
    from micl.training.loop import ContinualRun
    from conftest import tiny_recipe_overrides

    monkeypatch.setenv("MICL_CACHE_DIR", str(tmp_path / "cache"))
    config = load_recipe(REPO / "recipes" / "finetune.yaml", tiny_recipe_overrides(tiny_models, synth_root, tmp_path / "run"))
    run = ContinualRun(config)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    run.dataset(run.tasks[0], "train")  # loads the encoders and the LLM, encodes the split
    assert run.feature_stores.built == 1
    run.model.projectors  # noqa: B018
    torch.manual_seed(123)
    run.dataset(run.tasks[1], "train")
    assert run.feature_stores.built == 2 and torch.equal(torch.get_rng_state(), state)
