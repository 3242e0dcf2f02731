import json

import pytest

from micl.cli import main


def test_data_synth_command_generates_all_tasks(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--n-train", "4", "--n-val", "2", "--n-test", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0
    for task in ("synth_image_caption", "synth_image_qa", "synth_audio_caption", "synth_audio_qa",
                 "synth_video_caption", "synth_video_qa"):
        assert len((out / task / "train.jsonl").read_text().splitlines()) == 4


def test_data_synth_command_generates_only_the_tasks_asked_for(tmp_path):
    out = tmp_path / "synth"
    argv = ["data", "synth", "--out", str(out), "--n-train", "2", "--n-val", "1", "--n-test", "1"]
    assert main([*argv, "--tasks", "synth_image_qa", "synth_audio_qa"]) == 0
    assert json.loads((out / "manifest.json").read_text())["tasks"] == ["synth_image_qa", "synth_audio_qa"]
    assert not (out / "synth_video_qa").exists()
    assert main([*argv, "--tasks", "okvqa"]) == 2  # not a synthetic task


def test_report_on_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "results.json" in capsys.readouterr().err


def test_report_rewrites_report_from_results(tmp_path):
    results = {"tasks": ["a", "b"], "matrix": [[50.0, None], [40.0, 70.0]], "average": 55.0, "forgetting": 10.0,
               "bwt": -10.0, "fwt": None, "steps": []}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "70" in text and (tmp_path / "matrix.png").stat().st_size > 0


def test_compare_runs_methods_and_orders_and_writes_the_table(tiny_models, synth_root, tmp_path):
    from conftest import REPO, tiny_recipe_overrides

    overrides = [o for o in tiny_recipe_overrides(tiny_models, synth_root, tmp_path / "unused")
                 if not o.startswith("output_dir=")] + ["eval.forward_transfer=false"]
    recipes = [str(REPO / "recipes" / "finetune.yaml"), str(REPO / "recipes" / "moincl.yaml")]
    out = tmp_path / "compare"
    assert main(["compare", *recipes, "--orders", "quick", "--out", str(out), "--set", *overrides]) == 0
    table = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in table["runs"]] == ["finetune", "moincl"]
    assert all(r["complete"] and r["caption_average"] is not None and r["qa_average"] is not None
               for r in table["runs"])
    assert [s["method"] for s in table["summary"]] == ["finetune", "moincl"]
    text = (out / "compare.md").read_text()
    assert "| finetune | quick |" in text and (out / "compare.png").stat().st_size > 0
    run = json.loads((out / "finetune-quick" / "results.json").read_text())
    assert table["runs"][0]["average"] == run["average"]

    # --skip-missing tabulates what is finished and trains nothing (lwf was never run here)
    lwf = str(REPO / "recipes" / "lwf.yaml")
    assert main(["compare", *recipes, lwf, "--orders", "quick", "--out", str(out), "--skip-missing",
                 "--set", *overrides]) == 0
    assert [r["method"] for r in json.loads((out / "compare.json").read_text())["runs"]] == ["finetune", "moincl"]
    assert not (out / "lwf-quick").exists()

    # a run written before a setting existed (here lora.type and the moe_lora keys) is still the same run
    config_file = out / "finetune-quick" / "run_config.json"
    stored = json.loads(config_file.read_text())
    for key in ("type", "num_experts", "top_k", "routing"):
        del stored["lora"][key]
    config_file.write_text(json.dumps(stored))
    assert main(["compare", recipes[0], "--orders", "quick", "--out", str(out), "--set", *overrides]) == 0
    # ... but a changed value is not
    stored["lora"]["r"] = 4
    config_file.write_text(json.dumps(stored))
    assert main(["compare", recipes[0], "--orders", "quick", "--out", str(out), "--set", *overrides]) == 2


def test_prepare_help_describes_each_dataset_layout(capsys):
    for dataset, expected in (("okvqa", "OpenEnded_mscoco_train2014_questions.json"),
                              ("clotho_aqa", "clotho_aqa_train.csv"), ("flickr30k", "dataset_flickr30k.json")):
        with pytest.raises(SystemExit) as done:
            main(["data", "prepare", dataset, "--help"])
        assert done.value.code == 0 and expected in capsys.readouterr().out
