"""The `tema` command: run a stage notebook (what dvc.yaml calls) and switch parameter profiles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from tema import config, data, schema
from tema.llm import LLMError
from tema.tagging import CacheBusyError

# Mistakes in params.yaml or the raw data, an LLM endpoint that cannot be used, an answer cache in use by another run:
# one line each, no traceback.
USER_ERRORS = (config.ParamsError, data.DataError, LLMError, CacheBusyError)


def parse_value(text: str):
    return yaml.safe_load(text)


def profile_params(name: str) -> dict:
    """The parameters of a profile: the embedded defaults (profiles/default.yaml) overlaid with profiles/<name>.yaml.

    Mappings merge key by key; any other value of the profile replaces the default's. `evaluations` and `pages` are
    filled in (config.evaluations, config.pages: one table per dataset and one page unless the profile names them).
    """
    root = config.repo_root()
    base = config.load_params(root / "profiles" / "default.yaml")
    if name != "default":
        path = root / "profiles" / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (root / "profiles").glob("*.yaml"))
            raise config.ParamsError(f"unknown profile {name!r}: profiles/{name}.yaml not found; profiles: {known}")
        base = config.deep_merge(base, config.load_params(path))
    # the evaluate and report stages iterate over `evaluations` and `pages` (dvc.yaml): params.yaml always lists them
    derived = {"evaluations": config.evaluations(base), "pages": config.pages(base)}
    out = {}
    for key, value in base.items():
        if key not in derived:
            out[key] = value
        if key == "models":
            out.update(derived)
    return out


def apply_profile(name: str) -> Path:
    """Write params.yaml for a profile (see profile_params), once it passes the schema (tema.schema)."""
    base = profile_params(name)
    schema.validate(base)
    header = f"# Written by `tema profile {name}` from profiles/. Edit profiles/*.yaml, not this file.\n"
    out = config.repo_root() / "params.yaml"
    out.write_text(header + yaml.safe_dump(base, sort_keys=False), encoding="utf-8")
    return out


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
    parser = argparse.ArgumentParser(prog="tema", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run-notebook", help="execute a notebook with papermill into an ipynb + HTML report")
    run.add_argument("notebook")
    run.add_argument("output")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    prof = sub.add_parser("profile", help="write params.yaml for a profile (default, smoke, ...)")
    prof.add_argument("name")
    sub.add_parser("llm", help="the embedded OpenAI-compatible LLM server: `tema llm serve --help`")
    tags = sub.add_parser("tags", help="LLM tag generation outside DVC (long, resumable runs)")
    tags_sub = tags.add_subparsers(dest="tags_command", required=True)
    gen = tags_sub.add_parser("generate", help="fill the pass-1 answer cache of a dataset (resumable; Ctrl-C safe)")
    gen.add_argument("dataset")
    gen.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each domain")
    gen.add_argument("--all", action="store_true", help="then the LLM refinement and pass 2 too, writing data/tags/<dataset>/ "
                     "as the stage does (its answers cached as well; `dvc repro` then re-runs the stage from the cache)")
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
        print(f"wrote {apply_profile(args.name)}")
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
