import json

from micl.cli import main


def test_data_synth_command_generates_all_tasks(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--n-train", "4", "--n-val", "2", "--n-test", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0
    for task in ("synth_image_caption", "synth_image_qa", "synth_audio_caption", "synth_audio_qa",
                 "synth_video_caption", "synth_video_qa"):
        assert len((out / task / "train.jsonl").read_text().splitlines()) == 4


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
