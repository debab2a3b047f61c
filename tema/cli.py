"""The `tema` command: run a stage notebook (what dvc.yaml calls) and switch parameter profiles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from tema import config, data, schema
from tema.llm import LLMError
from tema.profiles import apply_profile, profile_params  # noqa: F401  (profile_params: the tests' and benchmarks' entry)
from tema.tagging import CacheBusyError

# Mistakes in params.yaml or the raw data, an LLM endpoint that cannot be used, an answer cache in use by another run:
# one line each, no traceback.
USER_ERRORS = (config.ParamsError, data.DataError, LLMError, CacheBusyError)


def parse_value(text: str):
    return yaml.safe_load(text)


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM end a long run cleanly (requests in flight finish and are cached, the server stops).

    A job started with `nohup ... &` from a script inherits SIGINT as ignored, and Python then keeps
    ignoring it; both signals are routed to KeyboardInterrupt explicitly.
    """
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of items)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def dataset_command(args: argparse.Namespace) -> int:
    from tema import datasets, profiles

    if args.dataset_command == "list":
        for name in datasets.known():
            described = datasets.spec(name)
            domains = " x ".join(d.name for d in described.domains.values())
            print(f"{name:<20} {described.format:<14} {domains}")
        return 0
    from tema.datasets.add import add

    dataset = add(args.name, args.folder, datasets.raw_root(), args.origin, args.replace)
    splits = dataset.sequences.groupby("split").size().to_dict()
    per_domain = dataset.items.groupby("domain").size().to_dict()
    print(f"added data/raw/{args.name}/: {dataset.n_items:,} items ({', '.join(f'{d} {n:,}' for d, n in per_domain.items())}), "
          f"examples {', '.join(f'{s} {splits.get(s, 0):,}' for s in ('train', 'valid', 'test'))}")
    report = dataset.provenance.get("import", {})
    dropped = report.get("users_dropped") or report.get("users_without_examples")
    if dropped:
        print(f"  {dropped:,} users left out (fewer interactions than the split rule needs)")
    print(f"\nTo run it, write profiles/{args.name}.yaml (`extends: smoke` instead for a minutes-long check):\n")
    print("  " + profiles.suggestion(args.name).rstrip("\n").replace("\n", "\n  "))
    print(f"\nthen: tema profile {args.name} && dvc repro")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run_command(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as err:
        lines = str(err).splitlines() or [type(err).__name__]
        for line in lines:
            print(f"tema: error: {line}", file=sys.stderr)
        return 2


def run_command(argv: list[str]) -> int:
    # Each command imports its stage when it runs, not at the top: `tema profile` and `tema llm` stay quick, and no
    # command pays for torch, papermill or the LLM client it does not use.
    if argv[:1] == ["llm"]:
        from tema.llm import main as llm_main

        return llm_main(argv[1:])
    if argv[:1] == ["recommend"]:
        from tema.recommend import main as recommend_main

        return recommend_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tema", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run-notebook", help="execute a notebook with papermill into an ipynb + HTML report")
    run.add_argument("notebook")
    run.add_argument("output")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    prof = sub.add_parser("profile", help="write params.yaml for a profile (default, smoke, ...)")
    prof.add_argument("name")
    prof.add_argument("--reset", action="store_true", help="drop the edits of params.yaml: write the profile alone")
    sub.add_parser("llm", help="the embedded OpenAI-compatible LLM server: `tema llm serve --help`")
    sub.add_parser("recommend", help="a trained run's top-k items for one user, with the tags shared with the history: "
                   "`tema recommend <dataset> <model> <user>`")
    tags = sub.add_parser("tags", help="LLM tag generation outside DVC (long, resumable runs)")
    tags_sub = tags.add_subparsers(dest="tags_command", required=True)
    gen = tags_sub.add_parser("generate", help="fill the pass-1 answer cache of a dataset (resumable; Ctrl-C safe)")
    gen.add_argument("dataset")
    gen.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each domain")
    gen.add_argument("--all", action="store_true", help="then the LLM refinement and pass 2 too, writing data/tags/<dataset>/ "
                     "as the stage does (its answers cached as well; `dvc repro` then re-runs the stage from the cache)")
    ds = sub.add_parser("dataset", help="datasets of one's own: `tema dataset add <name> <folder>` (README, 'Your own data')")
    ds_sub = ds.add_subparsers(dest="dataset_command", required=True)
    add = ds_sub.add_parser("add", help="vendor a folder (dataset.yaml + CSV/TSV files) into data/raw/<name>/, checked, "
                            "with checksums and provenance; prints the profile that runs it")
    add.add_argument("name", help="the dataset's name: letters, digits, '-' and '_'")
    add.add_argument("folder", type=Path, help="a folder with dataset.yaml and the files it names (docs/datasets.md)")
    add.add_argument("--origin", default=None, help="where the data came from (a URL, a citation), recorded in dataset.yaml")
    add.add_argument("--replace", action="store_true", help="replace an existing data/raw/<name>/ (only by data that reads)")
    ds_sub.add_parser("list", help="the datasets under data/raw/ with their format and domains")
    tune = sub.add_parser("tune", help="hyper-parameter search on validation, the same budget for every model (tema.tune)")
    tune.add_argument("dataset")
    tune.add_argument("--models", nargs="+", default=None, help="default: the models of params.yaml")
    tune.add_argument("--trials", type=positive_int, default=None, help="trials per model (default: tune.trials)")
    args = parser.parse_args(argv)
    if args.command == "run-notebook":
        from papermill.exceptions import PapermillExecutionError

        from tema.notebook import execute

        try:
            execute(args.notebook, args.output, {k: parse_value(v) for k, v in args.parameter})
        except PapermillExecutionError as err:  # papermill has shown the cell's traceback; end on what went wrong
            for line in f"{args.notebook} failed: {err.ename}: {err.evalue}".splitlines():
                print(f"tema: error: {line}", file=sys.stderr)
            return 1
    elif args.command == "profile":
        for line in apply_profile(args.name, reset=args.reset).lines():
            print(line)
    elif args.command == "dataset":
        return dataset_command(args)
    elif args.command == "tune":
        from tema.tune import run as tune_run

        table = tune_run(args.dataset, schema.load(), args.models, args.trials)
        print(table.drop(columns=["params"]).to_string(index=False))
        print(f"wrote reports/{args.dataset}/tuning.csv and reports/{args.dataset}/tuned-params.yaml")
    elif args.command == "tags":
        import json

        from tema.tags import generate
        from tema.tags import run as run_tags

        if args.all and args.limit is not None:
            parser.error("--all runs the stage's items (tags.limit_items in params.yaml); it takes no --limit")
        stop_on_signals()
        try:
            if args.all:  # the stage's own run does pass 1 first: one cache load, one server
                summary = run_tags(args.dataset, schema.load())
                print(json.dumps({k: summary["provenance"].get(k) for k in ("refinement", "mapping", "pass2")}, indent=1))
            else:
                print(json.dumps(generate(args.dataset, schema.load(), args.limit), indent=2))
        except KeyboardInterrupt as stop:
            print(f"stopped ({stop}); finished answers are cached, run the same command to resume", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
