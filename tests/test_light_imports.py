"""`import micl` and `micl --help` load neither PyTorch, transformers nor PEFT; micl's tuners register with
PEFT when a model needs them (a saved gated_lora / moe_lora phase loads in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from micl.cli import build_parser
from micl.config import LoraArgs
from micl.methods import METHODS

HEAVY = ("torch", "transformers", "peft")


def _python(script: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_micl_and_micl_help_load_no_heavy_library():
    script = f"""
import contextlib, io, json, sys
import micl, micl.cli
parser = micl.cli.build_parser()
for argv in (["--help"], ["data", "--help"], ["data", "prepare", "okvqa", "--help"], ["push", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        parser.parse_args(argv)
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    done = _python(script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == []


def test_train_help_lists_the_recipe_sections_the_methods_and_the_tasks(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    sections = text.split("recipe sections")[1]
    for key in ("output_dir", "order", "tasks", "method_args", "model", "lora", "train", "eval", "launch"):
        assert f"\n  {key} " in sections, key
    assert "epochs, batch_size, grad_accum" in sections
    methods = text.split("methods (")[1].split("tasks (")[0]
    assert sorted(line.split()[0] for line in methods.splitlines()[1:] if line.strip()) == sorted(METHODS)
    assert "harmony (needs lora.type: gated_lora)" in methods
    tasks = text.split("tasks (eval/tasks.yaml")[1]
    assert "okvqa                image, qa, vqa_accuracy" in tasks and "synth_av_caption " in tasks


@pytest.mark.parametrize("tuner", ["gated_lora", "moe_lora"])
def test_a_saved_phase_of_a_micl_tuner_loads_in_a_fresh_process(tiny_models, tmp_path, tuner):
    from micl.adapters import build_peft_config
    from micl.modeling.llm import load_llm
    from micl.modeling.multimodal import MultimodalLM

    torch.manual_seed(0)
    llm, tokenizer = load_llm(tiny_models["llm"])
    model = MultimodalLM.with_adapter(llm, tokenizer, {"image": 12}, build_peft_config(LoraArgs(type=tuner)),
                                      settings={"llm": tiny_models["llm"]})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    expected = model.llm(input_ids=ids).logits
    model.save_pretrained(tmp_path / "phase")
    assert json.loads((tmp_path / "phase" / "adapter" / "adapter_config.json").read_text())["peft_type"] == \
        tuner.upper()
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    config_class = "GatedLoraConfig" if tuner == "gated_lora" else "MoeLoraConfig"
    script = f"""
import torch
torch.set_num_threads({torch.get_num_threads()})  # the parent's reduction order: exact equality
from micl.modeling.multimodal import MultimodalLM  # nothing else of micl: the tuner registers itself
model = MultimodalLM.from_pretrained({str(tmp_path / 'phase')!r}).eval()
assert type(model.llm.peft_config["default"]).__name__ == {config_class!r}
data = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    logits = model.llm(input_ids=data["ids"]).logits
assert torch.equal(logits, data["logits"]), (logits - data["logits"]).abs().max()
print("OK")
"""
    done = _python(script, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")
