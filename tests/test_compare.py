"""`micl compare` tables from small run folders written without a model: per-metric columns (never one pooled
average), plasticity, final per-task scores, cost, mean ± sample std over seeds, results.json of earlier releases."""

import json
import shutil
import statistics
from pathlib import Path

import pytest

from micl.cli import main
from micl.evaluation.compare import cell_summaries, run_folder_name, run_summary, summarize, write_comparison
from micl.evaluation.report import write_report
from micl.run_folder import RunFolder
from micl.training.results import write_results

REPO = Path(__file__).resolve().parents[1]
OLD_RUN = Path(__file__).parent / "fixtures" / "run_097b00c"  # results.json: tests/fixtures/make_old_results.py
CAPTION, QA = "synth_image_caption", "synth_audio_qa"
METRICS = {CAPTION: "cider", QA: "exact_match"}


def fake_run(run_dir: Path, matrix, tasks=(CAPTION, QA), seed=0, phases=None, cost=None) -> Path:
    """A finished run folder (phase folders with metrics.json as the loop writes them) and its results.json, written
    by the loop's own write_results. `phases`: None = one task per step; else [(name, [tasks])]."""
    tasks = list(tasks)
    phases = phases or [(task, [task]) for task in tasks]
    cost = cost or {}
    folder = RunFolder(run_dir)
    run_dir.mkdir(parents=True)
    seen = 0
    for step, ((name, step_tasks), row) in enumerate(zip(phases, matrix)):
        seen += len(step_tasks)
        phase = folder.phase_folder(step, name)
        phase.mkdir()
        record = {"step": step, "task": name, "tasks": step_tasks, "row": row[:seen],
                  "metrics": {t: {"metric": METRICS[t], "score": v, METRICS[t]: v} for t, v in zip(tasks, row[:seen])},
                  "pre_step_scores": {}, "train_runtime_s": cost.get("train_s", 60.0),
                  "eval_runtime_s": cost.get("eval_s", 30.0), "trainable_params": cost.get("params", 2_000_000),
                  "extra_storage_bytes": cost.get("storage", [0] * len(matrix))[step],
                  "peak_rss_bytes": cost.get("rss", [2**30] * len(matrix))[step]}
        (phase / "metrics.json").write_text(json.dumps(record))
    config = {"seed": seed, "method": "finetune", "model": {"llm": "tiny"}, "train": {"epochs": 1}}
    write_results(folder, tasks, config, phases=[name for name, _ in phases])
    return run_dir


def test_run_summary_has_per_metric_columns_plasticity_final_scores_and_cost(tmp_path):
    # caption (CIDEr) learned first, forgotten by 30; QA (exact match) second
    run = fake_run(tmp_path / "run", [[80.0, None], [50.0, 40.0]],
                   cost={"storage": [1000, 3 * 2**20], "rss": [2**30, 3 * 2**30], "params": 4_000_000})
    results = json.loads((run / "results.json").read_text())
    assert results["by_metric"]["cider"]["forgetting"] == 30.0 and results["by_metric"]["exact_match"]["average"] == 40.0
    assert results["plasticity"] == pytest.approx(60.0) and results["efficiency"]["wall_time_s"] == 180.0
    values = run_summary(run, "finetune", "quick")["values"]
    assert values["cider/average"] == 50.0 and values["exact_match/average"] == 40.0  # not (50 + 40) / 2
    assert values["cider/forgetting"] == 30.0 and values["cider/bwt"] == -30.0
    assert values["exact_match/forgetting"] is None  # learned at the last step
    assert values["cider/plasticity"] == 80.0 and values["exact_match/plasticity"] == 40.0  # R[j][j]
    assert values[f"final/{CAPTION}"] == 50.0 and values[f"final/{QA}"] == 40.0
    assert values["cost/trainable_params"] == 4.0  # millions
    assert values["cost/extra_storage_bytes"] == 3.0  # MiB, the largest step's
    assert values["cost/peak_rss_bytes"] == 3.0 and values["cost/wall_time_s"] == 3.0  # GiB; (60 + 30) x 2 s in min

    write_comparison([run_summary(run, "finetune", "quick")], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method | n | CIDEr avg"))
    assert header.split(" | ")[2:7] == ["CIDEr avg", "CIDEr forgetting", "CIDEr BWT", "CIDEr FWT", "CIDEr MFT"]
    assert "exact match avg" in header and "| average |" not in md and "45.00" not in md  # no pooled average
    assert "| finetune | 1 | 50.00 | 30.00 | -30.00 | – | 80.00 | 40.00 | – | – | – | 40.00 |" in md
    assert f"| method | n | `{CAPTION}` | `{QA}` |" in md and "| finetune | 1 | 50.00 | 40.00 |" in md
    assert "| finetune | 1 | 4.00 | 3.00 | 3.00 | 3.00 |" in md


def test_seeds_give_mean_and_sample_std_with_n(tmp_path):
    rows = [run_summary(fake_run(tmp_path / f"s{seed}", [[x, None], [x, 50.0]], seed=seed), "ft", "quick")
            for seed, x in ((0, 10.0), (1, 20.0), (2, 30.0))]
    (cell,) = cell_summaries(rows)
    stat = cell["values"]["cider/average"]
    assert cell["n"] == 3 and cell["seeds"] == [0, 1, 2]
    assert stat == {"mean": 20.0, "std": pytest.approx(10.0), "n": 3}  # sample std (n - 1), not 8.16 (n)
    assert stat["std"] == pytest.approx(statistics.stdev([10, 20, 30]))
    assert cell["values"]["exact_match/average"] == {"mean": 50.0, "std": 0.0, "n": 3}
    md = write_comparison(rows, tmp_path / "cmp", command="micl compare x", seeds=[0, 1, 2]).read_text()
    assert "| ft | 3 | 20.00 ± 10.00 |" in md and "sample standard deviation (n − 1" in md
    assert "seeds 0, 1, 2" in md and "Produced by `micl compare x`" in md
    # one seed: no standard deviation
    md = write_comparison(rows[:1], tmp_path / "one").read_text()
    assert "| ft | 1 | 10.00 | 0.00 |" in md


def test_mean_over_orders_uses_the_seeds_that_have_every_order(tmp_path):
    rows = []
    for seed, (a, b) in enumerate(((10.0, 30.0), (20.0, 60.0))):
        for order, x in (("o1", a), ("o2", b)):
            rows.append(run_summary(fake_run(tmp_path / f"{order}_{seed}", [[x, None], [x, 50.0]], seed=seed),
                                    "ft", order))
    rows.append(run_summary(fake_run(tmp_path / "o1_2", [[99.0, None], [99.0, 50.0]], seed=2), "ft", "o1"))
    (method,) = summarize(rows, ["o1", "o2"])
    assert method["n"] == 2 and method["seeds"] == [0, 1]  # seed 2 has no o2 run
    stat = method["values"]["cider/average"]
    assert stat["mean"] == pytest.approx(30.0) and stat["std"] == pytest.approx(statistics.stdev([20.0, 40.0]))
    cells = {c["order"]: c for c in cell_summaries(rows)}
    assert cells["o1"]["n"] == 3 and cells["o2"]["n"] == 2
    md = write_comparison(rows, tmp_path / "cmp", orders=["o1", "o2"]).read_text()
    assert "## Mean over the orders (o1, o2)" in md and "## Order `o1`" in md and "## Order `o2`" in md


def test_one_step_runs_show_forgetting_bwt_fwt_as_not_applicable(tmp_path):
    joint = fake_run(tmp_path / "joint", [[70.0, 60.0]], phases=[("joint", [CAPTION, QA])])
    results = json.loads((joint / "results.json").read_text())
    assert results["learned_at"] == [0, 0] and results["complete"] and results["phases"] == ["joint"]
    assert results["forgetting"] is None and results["bwt"] is None and results["fwt"] is None
    values = run_summary(joint, "joint", "quick")["values"]
    assert values["cider/average"] == values["cider/plasticity"] == 70.0 and values["cider/forgetting"] is None
    md = write_comparison([run_summary(joint, "joint", "quick")], tmp_path / "cmp").read_text()
    assert "| joint | 1 | 70.00 | – | – | – | 70.00 | 60.00 | – | – | – | 60.00 |" in md
    assert "| 0: joint | 70.00 | 60.00 |" in (joint / "report.md").read_text()


def test_results_json_of_an_earlier_release_is_read_by_compare_and_report(tmp_path):
    run = tmp_path / "old"
    shutil.copytree(OLD_RUN, run, ignore=shutil.ignore_patterns("expected_*"))
    stored = json.loads((run / "results.json").read_text())
    assert "by_metric" not in stored and "efficiency" not in stored and "learned_at" not in stored
    row = run_summary(run, "replay", "quick")
    # step 0 of 2 done: the QA task not evaluated yet has its task definition's metric
    assert row["seed"] == 0 and row["complete"] is False and row["metrics"] == ["cider", "exact_match"]
    assert row["values"]["cider/average"] == 0.0 and row["values"]["cider/plasticity"] == 0.0
    assert row["values"]["cost/trainable_params"] is None  # not recorded then: shown as –
    md = write_comparison([row], tmp_path / "cmp").read_text()
    assert "| replay | 1 | 0.00 | – | – | – | 0.00 | – | – | – | – | – |" in md
    report = write_report(run).read_text()
    assert "| metric | CIDEr (1/1 tasks) | exact match (0/1 tasks) | definition |" in report
    assert "in progress: 1 of 2 steps" in report
    # and the loop's results.json rebuilt from that release's phase (its metrics.json has none of the new records)
    results = write_results(RunFolder(run), stored["tasks"], stored["config"])
    assert results["matrix"] == stored["matrix"] and results["pre_step_scores"] == stored["pre_step_scores"]
    assert results["learned_at"] == [0] and results["efficiency"]["wall_time_s"] is None


def _recipes(*names):
    return [str(REPO / "recipes" / f"{name}.yaml") for name in names]


def test_compare_skip_missing_over_seeds_reads_the_seed_folders_and_names_the_command(tmp_path, capsys):
    out = tmp_path / "compare"
    assert run_folder_name("finetune", "quick", 0) == "finetune-quick"  # a one-seed comparison's folders are reused
    assert run_folder_name("finetune", "quick", 2) == "finetune-quick_s2"
    fake_run(out / "finetune-quick", [[80.0, None], [50.0, 40.0]], seed=0)
    fake_run(out / "finetune-quick_s2", [[60.0, None], [30.0, 20.0]], seed=2)
    fake_run(out / "joint-quick_s1", [[90.0, 70.0]], seed=1, phases=[("joint", [CAPTION, QA])])
    fake_run(out / "finetune-quick_s1", [[75.0, None]], seed=1)  # unfinished: 1 of 2 steps
    argv = ["compare", *_recipes("finetune", "joint"), "--orders", "quick", "--seeds", "0", "1", "2",
            "--out", str(out), "--skip-missing"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "finetune / quick / seed 1: no finished run" in printed and "3 runs not finished" in printed
    table = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["seed"]) for r in table["runs"]] == [("finetune", 0), ("joint", 1), ("finetune", 2)]
    assert table["seeds"] == [0, 1, 2] and len(table["missing"]) == 3 and table["std"].startswith("sample")
    md = (out / "compare.md").read_text()
    assert f"Produced by `micl compare {' '.join(argv[1:3])} --orders quick --seeds 0 1 2 --out {out} " \
           f"--skip-missing`" in md
    assert "| finetune | 2 | 40.00 ± 14.14 | 30.00 ± 0.00 |" in md  # seeds 0 and 2: CIDEr 50, 30
    assert "| joint | 1 | 90.00 | – |" in md and "not finished, left out: 3" in md


def test_compare_refuses_settings_it_sets_itself(tmp_path, capsys):
    base = ["compare", *_recipes("finetune"), "--orders", "quick", "--out", str(tmp_path), "--skip-missing"]
    assert main([*base, "--seeds", "0", "1", "--set", "seed=3"]) == 2
    assert "--set seed=3" in capsys.readouterr().err
    assert main([*base, "--set", "output_dir=x"]) == 2
    assert main([*base, "--seeds", "1", "1"]) == 2 and "given twice" in capsys.readouterr().err


def test_compare_runs_each_seed_into_its_folder_and_reuses_finished_runs(tiny_models, synth_root, tmp_path, capsys):
    from conftest import tiny_recipe_overrides

    overrides = [o for o in tiny_recipe_overrides(tiny_models, synth_root, tmp_path / "unused")
                 if not o.startswith("output_dir=")]
    out = tmp_path / "compare"
    argv = ["compare", *_recipes("zeroshot"), "--orders", "quick", "--seeds", "0", "3", "--out", str(out),
            "--set", *overrides]
    assert main(argv) == 0
    for folder, seed in (("zeroshot-quick", 0), ("zeroshot-quick_s3", 3)):
        assert json.loads((out / folder / "run_config.json").read_text())["seed"] == seed
        assert json.loads((out / folder / "results.json").read_text())["complete"]
    table = json.loads((out / "compare.json").read_text())
    assert [r["seed"] for r in table["runs"]] == [0, 3] and table["cells"][0]["n"] == 2
    capsys.readouterr()
    assert main(argv) == 0  # a second time: both runs are finished and reused
    assert capsys.readouterr().out.count("all 1 steps already finished") == 2


def test_records_of_finished_runs_let_a_fresh_machine_reuse_them_and_refuse_other_settings(
        tiny_models, synth_root, tmp_path, capsys, monkeypatch):
    from conftest import tiny_recipe_overrides
    from micl.training.loop import ContinualRun

    overrides = [o for o in tiny_recipe_overrides(tiny_models, synth_root, tmp_path / "unused")
                 if not o.startswith("output_dir=")]
    out, records = tmp_path / "compare", tmp_path / "records"
    argv = ["compare", *_recipes("zeroshot"), "--orders", "quick", "--seeds", "0", "1", "--out", str(out),
            "--records", str(records), "--set", *overrides]
    assert main(argv) == 0
    kept = sorted(str(p.relative_to(records / "zeroshot-quick")) for p in (records / "zeroshot-quick").rglob("*")
                  if p.is_file())
    assert "results.json" in kept and "run_config.json" in kept and any(k.endswith("/metrics.json") for k in kept)
    assert all(k.endswith((".json", ".jsonl")) for k in kept)  # no weights, no logs
    first = json.loads((records / "compare.json").read_text())
    assert "--records" in (records / "compare.md").read_text()

    shutil.rmtree(out)  # a fresh machine: only the records (in git) are left

    def no_training(self, step, initial):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(ContinualRun, "_run_step", no_training)
    recorded = {p: p.read_bytes() for p in records.rglob("*") if p.is_file() and "-quick" in str(p.parent)}
    elsewhere = tmp_path / "elsewhere"  # restored into another --out
    argv = [*argv[:argv.index("--out") + 1], str(elsewhere), *argv[argv.index("--out") + 2:]]
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("restored from its record") == 2
    again = json.loads((elsewhere / "compare.json").read_text())
    assert [r["values"] for r in again["runs"]] == [r["values"] for r in first["runs"]]
    # a restored run's record is left as it was (not rewritten with the folder it was restored into)
    assert {p: p.read_bytes() for p in recorded} == recorded
    # nor by a second command over the same --out, where the runs are now finished in their folders
    assert main(argv) == 0
    assert "restored from its record" not in capsys.readouterr().out
    assert {p: p.read_bytes() for p in recorded} == recorded

    out = elsewhere
    shutil.rmtree(out)
    changed = [*argv, "eval.max_new_tokens=7"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "zeroshot-quick" in err and "different settings (eval)" in err
    assert (records / "zeroshot-quick" / "results.json").is_file()  # the finished work is kept


def test_a_record_is_only_written_for_a_complete_run_and_replaces_the_old_one_whole(tmp_path):
    from micl.errors import ConfigError
    from micl.run_records import restore_record, save_record
    from micl.training.run_identity import with_defaults

    partial = fake_run(tmp_path / "partial", [[75.0, None]])  # 1 of 2 steps
    assert not save_record(partial, tmp_path / "rec_partial") and not (tmp_path / "rec_partial").exists()
    done = fake_run(tmp_path / "done", [[80.0, None], [50.0, 40.0]])
    (done / "step_0_synth_image_caption" / "adapter").mkdir()
    (done / "step_0_synth_image_caption" / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    record = tmp_path / "rec"
    record.mkdir()
    (record / "stale.json").write_text("{}")
    stored = {"seed": 0, "method": "finetune", "order": [CAPTION, QA]}
    (done / "run_config.json").write_text(json.dumps(stored))
    assert save_record(done, record)
    assert not (record / "stale.json").exists() and not (record / "step_0_synth_image_caption" / "adapter").exists()
    assert (record / "results.json").read_bytes() == (done / "results.json").read_bytes()
    resolved = with_defaults(stored)
    assert restore_record(record, tmp_path / "fresh", resolved)
    assert (tmp_path / "fresh" / "step_1_synth_audio_qa" / "metrics.json").is_file()
    assert not restore_record(record, tmp_path / "fresh", resolved)  # a folder with a run in it is left alone
    with pytest.raises(ConfigError, match="different settings \\(seed\\)"):
        restore_record(record, tmp_path / "other", {**resolved, "seed": 1})
