"""Command line: `micl train RECIPE [key=value ...]`, `micl report RUN_DIR`, `micl push RUN_DIR --repo OWNER/NAME`,
`micl data synth --out DIR`, `micl data prepare DATASET --root DIR --out DATA_ROOT`.

User errors (recipe, data, media) print one line naming the file or key and exit with code 2; finished
steps stay on disk. Building the parser imports neither PyTorch, transformers nor PEFT (`micl --help` is
instant); `micl train --help` reads the recipe sections, methods and tasks when it is asked for.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import ConfigError, MiclError
from .utils import progress


def _train(args) -> int:
    from .config import load_recipe
    from .launch import already_launched, launch_requested, run_launch

    config = load_recipe(args.recipe, args.overrides)
    if launch_requested(config):  # the recipe's `launch` section: start the processes (micl/launch.py)
        micl_args = [*(["-v"] if args.verbose else []), "train", args.recipe, *args.overrides]
        return run_launch(config, args.recipe, micl_args)
    if config.launch.config is not None and already_launched() and os.environ.get("RANK", "0") == "0":
        logging.getLogger("micl").info("launch.config %r ignored: already running under a launcher",
                                       config.launch.config)
    from .training.loop import train

    results = train(config, source=args.recipe)
    from .utils.distributed import is_main_process

    if is_main_process():  # under accelerate launch / torchrun every rank gets here
        from .training.results import metric_line

        print(f"results: {os.path.join(config.output_dir, 'results.json')} ({metric_line(results)})")
    return 0


_COMPARE_KEYS = ("order", "seed", "output_dir")  # set by micl compare for each run


def _compare_command(args) -> str:
    """The command line that reproduces a comparison (the page names it)."""
    import shlex

    words = ["micl", "compare", *args.recipes, "--orders", *args.orders]
    if args.seeds is not None:
        words += ["--seeds", *map(str, args.seeds)]
    words += ["--out", str(args.out)]
    if args.records is not None:
        words += ["--records", str(args.records)]
    if args.overrides:
        words += ["--set", *args.overrides]
    if args.skip_missing:
        words.append("--skip-missing")
    return shlex.join(words)


def _compare(args) -> int:
    import gc
    import shutil
    from pathlib import Path

    from .config import load_recipe, parse_override
    from .launch import already_launched
    from .evaluation.compare import run_folder_name, run_summary, write_comparison
    from .run_records import is_complete, restore_record, save_record
    from .training.loop import ContinualRun

    for override in args.overrides:
        key = ".".join(parse_override(override)[0])
        if key in _COMPARE_KEYS:
            raise ConfigError(f"--set {override}: micl compare sets '{key}' of every run itself "
                              f"(--orders, --seeds, --out)")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, args.seeds))}: a seed is given twice")
    rows, missing = [], []
    for seed in args.seeds if args.seeds is not None else [None]:  # None: each recipe's own seed
        for order in args.orders:
            for recipe in args.recipes:
                method = Path(recipe).stem
                settings = [f"order={order}", *([] if seed is None else [f"seed={seed}"])]
                run_seed = load_recipe(recipe, [*settings, *args.overrides]).seed
                run_dir = Path(args.out) / run_folder_name(method, order, run_seed)
                config = load_recipe(recipe, [*settings, f"output_dir={run_dir}", *args.overrides])
                if config.launch.config is not None and not already_launched():
                    print(f"[micl compare] {recipe}: launch.config is ignored here (runs one recipe after another "
                          f"in this process; start micl compare under accelerate launch instead)", flush=True)
                label = f"{method} / {order} / seed {run_seed}"
                run = ContinualRun(config, source=recipe)
                record = None if args.records is None else Path(args.records) / run_dir.name
                restored = record is not None and restore_record(record, run_dir, run.resolved_config())
                if restored:
                    print(f"[micl compare] {label}: finished run restored from its record {record}", flush=True)
                if args.skip_missing and not is_complete(run_dir):
                    print(f"[micl compare] {label}: no finished run in {run_dir}, left out", flush=True)
                    missing.append(str(run_dir))
                    continue
                print(f"[micl compare] {label} -> {run_dir}", flush=True)
                run.run()
                del run
                gc.collect()  # the next run's peak RSS starts from what this one leaves
                if record is not None and not is_complete(record):
                    # a run with a complete record (restored now or earlier) leaves it as it was: saving it again
                    # would only rewrite config.output_dir with this --out
                    save_record(run_dir, record)
                rows.append(run_summary(run_dir, method, order, run_seed))
    if not rows:
        raise MiclError(f"{args.out}: no finished run to compare (--skip-missing trains nothing)")
    path = write_comparison(rows, args.out, _compare_command(args), seeds=args.seeds, orders=args.orders,
                            missing=missing)
    if args.records is not None:  # the table beside the records it was made from
        Path(args.records).mkdir(parents=True, exist_ok=True)
        for name in ("compare.md", "compare.json", "compare.png"):
            shutil.copy2(path.parent / name, Path(args.records) / name)
    print(f"comparison: {path}" + (f" ({len(missing)} runs not finished, left out)" if missing else ""))
    return 0


def _report(args) -> int:
    from .evaluation.report import write_report

    path = write_report(args.run_dir)
    print(f"report: {path}")
    return 0


def _push(args) -> int:
    from .hub import push_run

    def report(result: dict) -> None:
        print(f"{result['phase']}: {result['status']} -> {result['repo']} branch {result['branch']} "
              f"(commit {str(result['commit'])[:12]})", flush=True)

    push_run(args.run_dir, args.repo, private=args.private, endpoint=args.endpoint, report=report)
    return 0


def _synth(args) -> int:
    from .data.synth import generate_synth

    summary = generate_synth(args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                             tasks=args.tasks)
    print(f"micl-synth in {args.out}: {summary}")
    return 0


def _prepare(args) -> int:
    from .data.converters import prepare_dataset

    options = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        options[key.replace("-", "_")] = value
    report = prepare_dataset(args.dataset, args.root, args.out, **options)
    for skipped in report.skipped:
        print(skipped, flush=True)
    print(report.summary(), flush=True)
    return 0


def _train_epilog() -> str:
    """The recipe sections (micl.config), the methods (micl.methods) and the tasks (eval/tasks.yaml)."""
    import dataclasses
    import textwrap

    from .config import RecipeConfig
    from .data.tasks import packaged_tasks
    from .methods import METHODS

    lines = ["recipe sections (micl/config.py; any key can be overridden as section.key=value):"]
    for f in dataclasses.fields(RecipeConfig):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            about = ", ".join(g.name for g in dataclasses.fields(f.default_factory))
        else:
            about = f.metadata.get("help") or f"default {f.default!r}"
        lines.append(textwrap.fill(about, width=116, initial_indent=f"  {f.name:<13} ", subsequent_indent=" " * 16))
    lines.append("")
    lines.append("methods (method: NAME or a list of names; docs/methods.md):")
    for name, cls in sorted(METHODS.items()):
        needs = f" (needs lora.type: {cls.requires_tuner})" if cls.requires_tuner else ""
        lines.append(f"  {name}{needs}")
    lines.append("")
    lines.append("tasks (eval/tasks.yaml; a recipe adds its own under `tasks:`):")
    for spec in packaged_tasks().values():
        metric = "CIDEr" if spec.metric == "caption" else spec.metric
        lines.append(f"  {spec.name:<20} {spec.modality}, {spec.task_type}, {metric}")
    return "\n".join(lines)


class _LazyHelpParser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog is computed when its help is printed (`epilog_fn`), so that building
    the parser imports nothing heavy."""

    def __init__(self, *args, epilog_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self._epilog_fn is not None and self.epilog is None:
            self.epilog = self._epilog_fn()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="micl", description="continual fine-tuning of multimodal LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_LazyHelpParser)

    train = commands.add_parser("train", help="run a recipe's whole task order (resumes a killed run)",
                                epilog_fn=_train_epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/finetune.yaml")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=2")
    train.set_defaults(func=_train)

    compare = commands.add_parser(
        "compare", help="run recipes x task orders x seeds and tabulate them (mean ± std over seeds)",
        description="Runs every recipe on every order and seed (finished runs are reused; a killed one resumes), "
                    "then writes compare.md, compare.json and compare.png in --out: per task metric the average, "
                    "forgetting, BWT, FWT and plasticity, the final score of every task and the cost of each method, "
                    "as mean ± sample std over the seeds. Run folders: <recipe>-<order> for seed 0, "
                    "<recipe>-<order>_s<seed> for the others. See docs/metrics.md.")
    compare.add_argument("recipes", nargs="+", help="recipes, one per method (e.g. recipes/zeroshot.yaml "
                                                    "recipes/finetune.yaml recipes/joint.yaml)")
    compare.add_argument("--orders", nargs="+", default=["order1", "order2"], help="task orders")
    compare.add_argument("--seeds", nargs="+", type=int, default=None,
                         help="seeds of every run (default: each recipe's own seed)")
    compare.add_argument("--out", default="runs/compare", help="folder of the runs and the table")
    compare.add_argument("--records", default=None,
                         help="folder of finished runs' records (results and metrics, no weights; can live in git): "
                              "a run with a record is not trained again, a finished run gets one, and the table is "
                              "written there too (micl/run_records.py)")
    compare.add_argument("--set", dest="overrides", nargs="*", default=[], help="overrides for every run")
    compare.add_argument("--skip-missing", action="store_true",
                         help="tabulate only the runs already finished in --out (or recorded in --records); "
                              "train nothing")
    compare.set_defaults(func=_compare)

    report = commands.add_parser("report", help="(re)write report.md and plots of a run")
    report.add_argument("run_dir")
    report.set_defaults(func=_report)

    push = commands.add_parser("push", help="publish each finished phase of a run to the Hugging Face Hub",
                               description="One branch step-<k>-<task> per finished phase, main = the last one; "
                                           "re-running pushes only what is missing. Token: HF_TOKEN or "
                                           "`hf auth login` (never printed). See docs/hub.md.")
    push.add_argument("run_dir")
    push.add_argument("--repo", required=True, help="OWNER/NAME of the model repo (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    push.set_defaults(func=_push)

    data = commands.add_parser("data", help="datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="generate the micl-synth benchmark")
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n-train", type=int, default=64)
    synth.add_argument("--n-val", type=int, default=48)
    synth.add_argument("--n-test", type=int, default=96)
    synth.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="only these tasks (default: all)")
    synth.set_defaults(func=_synth)
    from .data.converters import CONVERTERS, converter_module

    prepare = data_commands.add_parser(
        "prepare", help="convert a real dataset from its official layout (docs/reproducing_moincl.md)",
        description="Writes OUT/<task>/{train,val,test}.jsonl (media paths relative to OUT, the data root of a "
                    "recipe); prints the counts and every skipped sample with its reason. "
                    "`micl data prepare DATASET --help` describes the layout DATASET expects.")
    datasets = prepare.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name in CONVERTERS:
        dataset = datasets.add_parser(name, help=f"the {name} task", description=converter_module(name).__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        dataset.add_argument("--root", required=True, help="the downloaded dataset, in its official layout")
        dataset.add_argument("--out", required=True, help="data root to write into (shared by all datasets)")
        dataset.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                             help="converter setting (see above), repeatable")
        dataset.set_defaults(func=_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("micl").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    progress.start_command()
    try:
        return args.func(args)
    except MiclError as err:
        progress.end_bars(sys.stderr)  # the error starts a line of its own, not the end of a progress bar's
        print(f"micl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
