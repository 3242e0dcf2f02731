"""recipes/paper/moincl_llama32.yaml: the reference setup loads as written, and runs a 2-step order of the
real task names end to end on CPU with tiny random models of the same kinds substituted for the Hub ids
(a test cannot download Llama-3.2-1B, CLIP ViT-L/14 or CLAP)."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from test_hf_encoders import hf_models  # noqa: F401  (fixture: tiny CLIP / SigLIP / Whisper / CLAP folders)
from micl.cli import main
from micl.config import load_recipe
from micl.data.orders import resolve_order

RECIPE = REPO / "recipes" / "paper" / "moincl_llama32.yaml"


def test_recipe_is_the_reference_setup():
    config = load_recipe(RECIPE)
    assert config.model.llm == "meta-llama/Llama-3.2-1B-Instruct" and config.model.dtype == "bfloat16"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 32, 0.1)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert (config.eval.num_beams, config.eval.max_new_tokens, config.eval.repetition_penalty) == (5, 80, 1.15)
    assert config.methods == ["moincl"] and config.method_args["moincl"]["temperature"] == 5.0
    assert (config.train.epochs, config.train.early_stopping_patience) == (40, 5)
    assert (config.train.lr, config.train.weight_decay, config.train.batch_size, config.train.grad_accum) == \
        (1e-5, 0.05, 8, 4)
    assert "accelerate launch --config_file recipes/accelerate/" in RECIPE.read_text()
    assert resolve_order(config.order) == ["audiocaps", "flickr30k", "msvd_qa", "clotho_aqa", "okvqa", "msrvtt"]
    assert resolve_order("paper_order2") == ["flickr30k", "msrvtt", "msvd_qa", "okvqa", "audiocaps", "clotho_aqa"]


def test_per_step_settings_are_the_reference_scripts():
    """run_order_1.sh / run_order_2.sh of the reference: --alpha_fusion, --pseudo_num, --lambda_kl per step."""
    from micl.methods.moincl import MoInCL, MoInCLArgs, per_step, pseudo_targets_apply
    from micl.data.tasks import get_task

    expected = {
        RECIPE: {"alpha": [0.1, 0.1, 0.1, 0.5, 0.5], "with_pseudo": {3: (4, 1.0), 4: (1, 0.5), 5: (4, 0.1)}},
        RECIPE.with_name("moincl_llama32_order2.yaml"): {
            "alpha": [0.8, 0.5, 0.8, 0.1, 0.5], "with_pseudo": {2: (4, 0.5), 3: (2, 0.1), 5: (4, 1.0)}},
    }
    for path, want in expected.items():
        config = load_recipe(path)
        args = MoInCLArgs(**config.method_args["moincl"])
        MoInCL(args)  # valid settings
        assert args.alpha == want["alpha"] and args.caption_max_new_tokens == 30
        tasks = [get_task(name) for name in resolve_order(config.order)]
        pseudo_steps = {step: (per_step(args.pseudo_num, step), per_step(args.lambda_kl, step))
                        for step in range(1, len(tasks)) if pseudo_targets_apply(tasks[step], tasks[:step])}
        assert pseudo_steps == want["with_pseudo"], path.name


def _real_task_data(synth_root, out):
    """Two real tasks in micl's unified layout (as `micl data prepare` writes them), media borrowed from
    micl-synth: flickr30k (image captioning, 5 references) and clotho_aqa (audio QA)."""
    from micl.data.tasks import load_task_split

    for task, source, kind in (("flickr30k", "synth_image_caption", "caption"), ("clotho_aqa", "synth_audio_qa", "qa")):
        for split in ("train", "val", "test"):
            rows = load_task_split(synth_root, source, split)[:8]
            (out / task).mkdir(parents=True, exist_ok=True)
            with open(out / task / f"{split}.jsonl", "w") as handle:
                for row in rows:
                    media = out / "media" / task / split / row["media"].rsplit("/", 1)[1]
                    media.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(synth_root / row["media"], media)
                    refs = (row["references"] * 5)[:5] if kind == "caption" else row["references"]
                    handle.write(json.dumps({**row, "id": row["id"], "task": task, "media": str(media.relative_to(out)),
                                             "references": refs}) + "\n")


def test_two_real_tasks_end_to_end_with_tiny_models_of_the_same_kinds(tiny_models, hf_models, synth_root, tmp_path):
    data = tmp_path / "data"
    _real_task_data(synth_root, data)
    out = tmp_path / "run"
    assert main(["train", str(RECIPE),
                 f"output_dir={out}", f"data.root={data}", "order=[flickr30k,clotho_aqa]",
                 f"model.llm={tiny_models['llm']}", f"model.image_encoder={hf_models['clip_vision']}",
                 f"model.audio_encoder={hf_models['clap_audio']}",  # the recipe's kinds: CLIP tower, CLAP tower
                 "model.image_tokens=16", "model.audio_tokens=4",  # the tiny towers' grids are smaller
                 "data.max_train_samples=8", "data.max_eval_samples=4", "train.epochs=1", "train.batch_size=4",
                 "train.grad_accum=1", "train.save_steps=1", "train.tensorboard=false", "eval.batch_size=4",
                 "eval.max_new_tokens=6", "eval.forward_transfer=false", "method_args.moincl.instruction_k=1",
                 # audio is new at step 1: pseudo captions are switched on to run them on the real task names
                 "method_args.moincl.pseudo=true", "method_args.moincl.pseudo_num=2",
                 "method_args.moincl.lambda_kl=1.0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["tasks"] == ["flickr30k", "clotho_aqa"]
    assert len(results["matrix"]) == 2 and len(results["matrix"][1]) == 2
    step = json.loads((out / "step_1_clotho_aqa" / "metrics.json").read_text())
    assert step["metrics"]["flickr30k"]["metric"] == "cider" and step["metrics"]["clotho_aqa"]["metric"] == "exact_match"
    model = json.loads((out / "step_1_clotho_aqa" / "micl_model.json").read_text())
    assert model["dtype"] == "bfloat16" and model["encoders"]["image"].startswith("image|")
    assert "clap" in model["encoders"]["audio"]
    # MoInCL ran: pseudo captions of the QA inputs by the previous step's model (beam 5, as the recipe says)
    assert (out / "pseudo_targets").is_dir()
    assert len(step["early_stopping"]["val_scores"]) == 1  # scored on the val split after its one epoch


PAPER_LAUNCHES = ["ddp.yaml", pytest.param("zero2.yaml", marks=pytest.mark.slow)]


@pytest.mark.parametrize("config", PAPER_LAUNCHES)
def test_paper_recipe_under_the_readme_launch_lines(config, tiny_models, hf_models, synth_root, tmp_path):
    """The README's multi-GPU lines for the paper recipe, `accelerate launch --config_file
    recipes/accelerate/{ddp,zero2}.yaml -m micl train recipes/paper/moincl_llama32.yaml`, on 2 CPU processes
    with the tiny models of the same kinds: bf16, MoInCL with pseudo captions, early stopping, beam 5."""
    from test_distributed import _env, _free_port

    data = tmp_path / "data"
    _real_task_data(synth_root, data)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / config), "--num_processes", "2", "--main_process_port",
           str(_free_port()), "-m", "micl", "train", str(RECIPE), f"output_dir={out}", f"data.root={data}",
           "order=[clotho_aqa,flickr30k]", f"model.llm={tiny_models['llm']}",
           f"model.image_encoder={hf_models['clip_vision']}", f"model.audio_encoder={hf_models['clap_audio']}",
           "model.image_tokens=16", "model.audio_tokens=4", "data.max_train_samples=8", "data.max_eval_samples=4",
           "train.epochs=1", "train.batch_size=2", "train.grad_accum=2", "train.save_steps=1",
           "train.tensorboard=false", "eval.batch_size=2", "eval.max_new_tokens=4", "eval.forward_transfer=false",
           "method_args.moincl.instruction_k=1", "method_args.moincl.pseudo_num=1"]
    done = subprocess.run(cmd, cwd=REPO, env=_env(MICL_CACHE_DIR=str(tmp_path / "cache")), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["tasks"] == ["clotho_aqa", "flickr30k"]
    step = json.loads((out / "step_1_flickr30k" / "metrics.json").read_text())
    assert step["world_size"] == 2 and step["optimizer_steps"] == 1  # 8 samples = 2 processes x 2 x 2
    assert len(step["early_stopping"]["val_scores"]) == 1
