"""Publishing runs to the Hub (`micl push`, recipe `push_to_hub`), with the real huggingface_hub client against
the fake Hub of tests/hub_server.py on 127.0.0.1. One tiny 2-step training run (with push_to_hub) is shared
by the module; each other test pushes a copy of it to a fresh server."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import micl.hub
from conftest import REPO, tiny_recipe_overrides
from hub_server import FakeHubServer, use_fake_hub
from micl.cli import main
from micl.errors import ConfigError, MiclError

RECIPE = str(REPO / "recipes" / "finetune.yaml")
TASKS = ["synth_image_caption", "synth_audio_qa"]
PHASES = [f"step_{k}_{t}" for k, t in enumerate(TASKS)]
BRANCHES = [f"step-{k}-{t}" for k, t in enumerate(TASKS)]
TOKEN = "hf_fakeSecretToken1234567890"  # must never show up in output, cards or hub_push.json
REPO_ID = "tester/continual"


def _cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _train_args(tiny_models, synth_root, out, *extra):
    return ["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out),
            f"order=[{','.join(TASKS)}]", "eval.forward_transfer=false", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models, synth_root):
    """A 2-step run with `push_to_hub: true`; the push after step 2 fails (the Hub answers 500 to every commit)."""
    root = tmp_path_factory.mktemp("hub_run")
    out = root / "run"
    with FakeHubServer() as server, pytest.MonkeyPatch.context() as mp:
        use_fake_hub(mp, server.url, root / "hf_cache", TOKEN)
        mp.setattr(micl.hub, "RETRY_BASE_S", 0.001)
        calls = []
        real_push = micl.hub.push_run

        def spy(run_dir, *args, **kwargs):
            calls.append(sorted(p.name for p in Path(run_dir).glob("step_*")))
            if len(calls) == 2:  # the push after the last step: every commit fails
                server.hub.fail_next("commit", 1000)
            try:
                return real_push(run_dir, *args, **kwargs)
            finally:
                server.hub.fail_next("commit", 0)

        mp.setattr(micl.hub, "push_run", spy)
        code, stdout, stderr = _cli(*_train_args(tiny_models, synth_root, out, "push_to_hub=true",
                                                 f"hub_repo={REPO_ID}"))
        mp.setattr(micl.hub, "push_run", real_push)
        yield SimpleNamespace(out=out, server=server, calls=calls, code=code, stdout=stdout, stderr=stderr,
                              args=_train_args(tiny_models, synth_root, out))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHubServer() as server:
        use_fake_hub(monkeypatch, server.url, tmp_path / "hf_cache", TOKEN)
        monkeypatch.setattr(micl.hub, "RETRY_BASE_S", 0.001)
        yield server


def _copy_run(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained.out, run)
    (run / micl.hub.STATE_FILE).unlink(missing_ok=True)
    return run


def _branches(repo_id=REPO_ID) -> dict[str, str]:
    from huggingface_hub import HfApi

    return {b.name: b.target_commit for b in HfApi().list_repo_refs(repo_id).branches}


def _expected_files(phase: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in (phase / "adapter").iterdir() if p.name != "README.md"}
    for name in ("projectors.safetensors", "micl_model.json", "metrics.json"):
        files[name] = (phase / name).read_bytes()
    return files


def _snapshot(revision: str, repo_id=REPO_ID) -> dict[str, bytes]:
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, revision=revision))
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _state(run: Path) -> dict:
    return json.loads((run / micl.hub.STATE_FILE).read_text())


# ---- push_to_hub in a recipe ----------------------------------------------------------------------------
def test_recipe_push_to_hub_pushes_after_every_step_and_a_failed_push_keeps_the_step(trained):
    hub = trained.server.hub
    # one push after each step, the first before step 2 existed
    assert trained.calls == [PHASES[:1], PHASES]
    assert f"[micl] pushed {PHASES[0]} to {REPO_ID} branch {BRANCHES[0]}" in trained.stdout
    # the push after step 2 failed: the run says so on one line and exits 2, but both steps are saved
    assert trained.code == 2
    errors = [line for line in trained.stderr.splitlines() if line.startswith("micl: error:")]
    assert len(errors) == 1 and PHASES[1] in errors[0] and "HTTP 500" in errors[0] and "micl push" in errors[0]
    results = json.loads((trained.out / "results.json").read_text())
    assert results["complete"] is True and len(results["matrix"]) == 2
    assert all((trained.out / p / "metrics.json").is_file() for p in PHASES)
    assert set(_state(trained.out)["phases"]) == {PHASES[0]}
    assert set(hub.repos[REPO_ID].branches) == {"main", BRANCHES[0]}

    # re-running the same `micl train` retries the push (still failing here) without touching the steps
    hub.fail_next("commit", 1000)
    code, _, stderr = _cli(*trained.args, "push_to_hub=true", f"hub_repo={REPO_ID}")
    hub.fail_next("commit", 0)
    assert code == 2 and PHASES[1] in stderr and "HTTP 500" in stderr
    assert json.loads((trained.out / "results.json").read_text())["matrix"] == results["matrix"]

    # `micl push` completes it
    code, stdout, _ = _cli("push", trained.out, "--repo", REPO_ID)
    assert code == 0
    assert f"{PHASES[0]}: already pushed" in stdout and f"{PHASES[1]}: pushed" in stdout
    assert set(_branches()) == {"main", *BRANCHES}
    commits = hub.commit_total(REPO_ID)
    assert commits == 3  # initial + one per phase

    # toggling push_to_hub on a finished run is not a "different settings" rerun; nothing is pushed twice
    for toggle in ("push_to_hub=false", "push_to_hub=true"):
        code, stdout, stderr = _cli(*trained.args, toggle, f"hub_repo={REPO_ID}")
        assert code == 0, stderr
        assert "already finished" in stdout
    assert hub.commit_total(REPO_ID) == commits
    for text in (trained.stdout, trained.stderr, stdout, (trained.out / micl.hub.STATE_FILE).read_text()):
        assert TOKEN not in text
    assert hub.tokens_seen == {TOKEN}


def test_push_to_hub_needs_hub_repo():
    from micl.config import load_recipe

    with pytest.raises(ConfigError, match="'hub_repo' is required when 'push_to_hub' is true"):
        load_recipe(RECIPE, ["push_to_hub=true"])
    with pytest.raises(ConfigError, match="hub_repo"):
        load_recipe(RECIPE, ["push_to_hub=true", "hub_repo=not a repo"])
    config = load_recipe(RECIPE, ["push_to_hub=true", "hub_repo=me/run", "hub_private=true"])
    assert (config.push_to_hub, config.hub_repo, config.hub_private) == (True, "me/run", True)


# ---- micl push ----------------------------------------------------------------------------------------
def test_push_publishes_each_phase_on_its_branch_and_main_is_the_last(trained, hub, tmp_path):
    run = _copy_run(trained, tmp_path)
    code, stdout, stderr = _cli("push", run, "--repo", REPO_ID)
    assert code == 0, stderr
    assert [line.split(":")[0] for line in stdout.splitlines()] == PHASES
    assert all(": pushed -> " in line for line in stdout.splitlines())

    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    assert HfApi().repo_exists(REPO_ID)
    branches = _branches()
    assert set(branches) == {"main", *BRANCHES}
    state = _state(run)
    assert state["repo"] == REPO_ID and state["endpoint"] == hub.url
    for phase, branch in zip(PHASES, BRANCHES):
        files = _snapshot(branch)
        expected = _expected_files(run / phase)
        assert set(files) == {*expected, "README.md", ".gitattributes"}
        assert all(files[name] == data for name, data in expected.items())
        one = Path(hf_hub_download(REPO_ID, "adapter_model.safetensors", revision=branch))
        assert one.read_bytes() == expected["adapter_model.safetensors"]
        record = state["phases"][phase]
        assert record["branch"] == branch and record["commit"] == branches[branch]
        assert record["files"] == {n: hashlib.sha256(files[n]).hexdigest() for n in record["files"]}
        assert set(record["files"]) == set(files) - {".gitattributes"}

        card = files["README.md"].decode()
        assert TOKEN not in card
        data = ModelCard(card).data
        assert data.library_name == "peft" and {"micl", "continual-learning"} <= set(data.tags)
        metrics = json.loads(expected["metrics.json"])
        for task, score in zip(TASKS, metrics["row"]):
            assert f"| {task} | {metrics['metrics'][task]['metric']} | {score:.2f} |" in card
        assert f'MultimodalLM.from_pretrained("{REPO_ID}", revision="{branch}"' in card
        assert f'PeftModel.from_pretrained(base, "{REPO_ID}", revision="{branch}")' in card
        assert str(tmp_path) not in card  # no local paths
    assert _snapshot("main") == _snapshot(BRANCHES[-1])
    assert branches["main"] == branches[BRANCHES[-1]]

    # re-running changes nothing on the Hub
    commits, commit_requests = hub.hub.commit_total(REPO_ID), hub.hub.count("commit")
    code, stdout, _ = _cli("push", run, "--repo", REPO_ID)
    assert code == 0
    assert all(": already pushed -> " in line for line in stdout.splitlines()) and len(stdout.splitlines()) == 2
    assert hub.hub.commit_total(REPO_ID) == commits and hub.hub.count("commit") == commit_requests
    assert _branches() == branches
    assert TOKEN not in stdout and TOKEN not in (run / micl.hub.STATE_FILE).read_text()
    assert hub.hub.unhandled == []

    # a branch deleted on the Hub is recreated at its recorded commit: no new commit
    HfApi().delete_branch(REPO_ID, branch=BRANCHES[0])
    code, stdout, _ = _cli("push", run, "--repo", REPO_ID)
    assert code == 0 and f"{PHASES[0]}: pushed" in stdout and f"{PHASES[1]}: already pushed" in stdout
    assert _branches() == branches and hub.hub.commit_total(REPO_ID) == commits
    # ... and without hub_push.json either: one commit on a new branch from main; main stays at the last phase
    HfApi().delete_branch(REPO_ID, branch=BRANCHES[0])
    (run / micl.hub.STATE_FILE).unlink()
    code, stdout, _ = _cli("push", run, "--repo", REPO_ID)
    assert code == 0 and f"{PHASES[0]}: pushed" in stdout and f"{PHASES[1]}: pushed" in stdout
    assert hub.hub.commit_total(REPO_ID) == commits + 1
    assert _branches()["main"] == branches["main"] == _branches()[BRANCHES[1]]
    restored = _snapshot(BRANCHES[0])
    assert set(restored) == {*_expected_files(run / PHASES[0]), "README.md", ".gitattributes"}
    assert all(restored[n] == d for n, d in _expected_files(run / PHASES[0]).items())


def test_failed_commit_is_not_recorded_and_a_rerun_pushes_only_the_rest(trained, hub, tmp_path):
    run = _copy_run(trained, tmp_path)
    attempts = micl.hub.RETRY_ATTEMPTS
    hub.hub.fail_next("commit", attempts, after=1)  # phase 1 goes through, phase 2's commit fails every time
    code, stdout, stderr = _cli("push", run, "--repo", REPO_ID)
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("micl: error:")]
    assert len(errors) == 1 and PHASES[1] in errors[0] and "HTTP 500" in errors[0], stderr
    assert f"{PHASES[0]}: pushed" in stdout and PHASES[1] not in stdout
    assert hub.hub.count("commit") == 1 + attempts
    assert set(_state(run)["phases"]) == {PHASES[0]}
    assert set(_branches()) == {"main", BRANCHES[0]}

    code, stdout, stderr = _cli("push", run, "--repo", REPO_ID)
    assert code == 0, stderr
    assert f"{PHASES[0]}: already pushed" in stdout and f"{PHASES[1]}: pushed" in stdout
    assert hub.hub.commit_total(REPO_ID) == 3  # initial + one per phase: no duplicate
    assert set(_state(run)["phases"]) == set(PHASES)
    assert set(_branches()) == {"main", *BRANCHES}
    assert _snapshot("main") == _snapshot(BRANCHES[1])
    assert all(_snapshot(BRANCHES[1])[n] == d for n, d in _expected_files(run / PHASES[1]).items())
    assert TOKEN not in stdout + stderr


def test_transient_errors_are_retried_with_exponential_backoff(trained, hub, tmp_path, monkeypatch):
    run = _copy_run(trained, tmp_path)
    waits = []
    monkeypatch.setattr(micl.hub, "_sleep", waits.append)
    monkeypatch.setattr(micl.hub, "RETRY_BASE_S", 0.5)
    hub.hub.fail_next("create_repo", 1, status=503)
    hub.hub.fail_next("refs", 1, status=429)
    hub.hub.fail_next("commit", micl.hub.RETRY_ATTEMPTS - 1, status=500)
    hub.hub.fail_next("create_branch", 1, status=502)
    results = micl.hub.push_run(run, REPO_ID)
    assert [r["status"] for r in results] == ["pushed", "pushed"]
    assert waits == [0.5, 0.5, *[0.5 * 2**i for i in range(micl.hub.RETRY_ATTEMPTS - 1)], 0.5]
    assert hub.hub.commit_total(REPO_ID) == 3
    assert set(_branches()) == {"main", *BRANCHES}
    assert set(_state(run)["phases"]) == set(PHASES)


def test_missing_or_rejected_token_is_a_clear_error(trained, hub, tmp_path, monkeypatch):
    run = _copy_run(trained, tmp_path)
    monkeypatch.delenv("HF_TOKEN")
    code, _, stderr = _cli("push", run, "--repo", REPO_ID)
    assert code == 2 and "no Hugging Face token" in stderr
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.hub.token = "hf_theOnlyValidToken"
    code, _, stderr = _cli("push", run, "--repo", REPO_ID)
    assert code == 2 and "HTTP 401" in stderr and TOKEN not in stderr
    assert not (run / micl.hub.STATE_FILE).exists()


def test_an_unreachable_hub_is_retried_then_a_clear_error(trained, hub, tmp_path, monkeypatch):
    import socket

    run = _copy_run(trained, tmp_path)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    waits = []
    monkeypatch.setattr(micl.hub, "_sleep", waits.append)
    code, _, stderr = _cli("push", run, "--repo", REPO_ID, "--endpoint", f"http://127.0.0.1:{port}")
    assert code == 2 and "cannot reach the Hub" in stderr and f"after {micl.hub.RETRY_ATTEMPTS} attempts" in stderr
    assert len(waits) == micl.hub.RETRY_ATTEMPTS - 1
    assert not (run / micl.hub.STATE_FILE).exists()


# ---- loading from the Hub -----------------------------------------------------------------------------
def _generate(model, seed: int = 0) -> list[str]:
    from micl.data.collator import MultimodalCollator
    from micl.modeling.prompting import PromptBuilder

    builder = PromptBuilder(model.tokenizer, "")
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for modality, instruction in [("image", "describe the image."), ("audio", "what is the pitch?"),
                                  ("image", "what colour is the shape?")]:
        features = torch.randn(4, model.media_dims[modality], generator=generator)
        enc = builder.encode(instruction, {modality: 4})
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels, "media_mask": enc.media_mask,
                         "media": {modality: features}})
    batch = MultimodalCollator(model.tokenizer.pad_token_id)(examples)
    return model.eval().generate(batch, max_new_tokens=6)


def test_multimodal_and_peft_load_a_pushed_revision(trained, hub, tmp_path, tiny_models):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from micl.modeling.multimodal import MultimodalLM

    run = _copy_run(trained, tmp_path)
    micl.hub.push_run(run, REPO_ID)
    projectors = []
    for phase, branch in zip(PHASES, BRANCHES):
        local = MultimodalLM.from_pretrained(run / phase)
        remote = MultimodalLM.from_pretrained(REPO_ID, revision=branch)
        local_state, remote_state = local.projectors.state_dict(), remote.projectors.state_dict()
        assert all(torch.equal(local_state[k], remote_state[k]) for k in local_state)
        lora_local, lora_remote = get_peft_model_state_dict(local.llm), get_peft_model_state_dict(remote.llm)
        assert lora_local.keys() == lora_remote.keys()
        assert all(torch.equal(lora_local[k], lora_remote[k]) for k in lora_local)
        assert _generate(remote) == _generate(local)
        projectors.append(remote_state)

        base = AutoModelForCausalLM.from_pretrained(tiny_models["llm"])
        peft_model = PeftModel.from_pretrained(base, REPO_ID, revision=branch)
        plain = get_peft_model_state_dict(peft_model)
        assert plain.keys() == lora_local.keys() and all(torch.equal(plain[k], lora_local[k]) for k in plain)
    # the revision is honoured: the two steps' projectors differ
    assert any(not torch.equal(projectors[0][k], projectors[1][k]) for k in projectors[0])
    with pytest.raises(MiclError, match="no such revision"):
        MultimodalLM.from_pretrained(REPO_ID, revision="step-9-nothing")
    with pytest.raises(MiclError, match="revision= only applies"):
        MultimodalLM.from_pretrained(run / PHASES[0], revision=BRANCHES[0])


# ---- model card and branch names (no server) ---------------------------------------------------------
def test_card_front_matter_names_a_hub_base_model_and_branch_names_are_valid(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    settings_file = run / PHASES[1] / "micl_model.json"
    settings = json.loads(settings_file.read_text())
    settings["llm"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    settings_file.write_text(json.dumps(settings))
    phase = micl.hub.finished_phases(run)[1]
    card = micl.hub.model_card(run, phase, "me/run")
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"micl", "continual-learning"} <= set(front["tags"])
    assert "step 2/2" in card and "`synth_audio_qa` (this step)" in card
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in card
    # a local base model is not put in the metadata, nor its path in the card
    local = micl.hub.model_card(run, micl.hub.finished_phases(run)[0], "me/run")
    assert "base_model" not in yaml.safe_load(local.split("---")[1])
    assert str(Path(trained.out).parent) not in local

    assert micl.hub.branch_name(2, "synth_video_qa") == "step-2-synth_video_qa"
    assert micl.hub.branch_name(3, "my task/v2..x.lock") == "step-3-my-task-v2.x-lock"
    # only finished phases: an interrupted step 2 is not pushed
    (run / PHASES[1] / "metrics.json").unlink()
    assert [p.name for p in micl.hub.finished_phases(run)] == PHASES[:1]
