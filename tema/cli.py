"""The `tema` command: the stage notebooks (what dvc.yaml calls), parameter profiles, datasets, tags, tuning, recommendations."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from tema import config, data, profiles, schema
from tema.atomic import WriteError
from tema.llm import LLMError
from tema.profiles import apply_profile, profile_params  # noqa: F401  (profile_params: the tests' and benchmarks' entry)
from tema.tagging import CacheBusyError

# Mistakes in params.yaml, a profile or the raw data (tema.schema and tema.datasets raise these two), an LLM endpoint
# that cannot be used, an answer cache in use by another run, a file that could not be written (a full disk; the
# previous file is kept): one line each, no traceback (main; a missing file too).
USER_ERRORS = (config.ParamsError, data.DataError, LLMError, CacheBusyError, WriteError)


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


def notebook_failure(notebook: str, output: str, err) -> list[str]:
    """A failed notebook in a few lines: the notebook, the failing cell (as its report numbers it) and its error, then
    the executed notebook that holds the traceback (papermill's own message is the whole traceback)."""
    cell = f"cell In [{err.exec_count}]" if err.exec_count is not None else f"cell {err.cell_index}"
    lines = f"{err.evalue}".splitlines() or [""]
    shown = lines[:5] + ([f"... ({len(lines) - 5} more lines)"] if len(lines) > 5 else [])
    html = str(Path(output).with_suffix(".html"))
    return [f"{notebook} failed at {cell}: {err.ename}: {shown[0]}".rstrip(": "), *shown[1:],
            f"the executed notebook, with the traceback: {output} ({html})"]


def dataset_command(args: argparse.Namespace) -> int:
    from tema import datasets

    if args.dataset_command == "list":
        for name in datasets.known():
            described = datasets.spec(name)
            domains = " x ".join(d.name for d in described.domains.values())
            print(f"{name:<20} {described.format:<14} {domains}")
        return 0
    from tema.datasets.add import add

    try:
        dataset = add(args.name, args.folder, datasets.raw_root(), args.origin, args.replace)
    except FileNotFoundError:
        raise  # main: '<path>: not found'
    except OSError as err:  # a full disk, a folder without permission: one line naming the path (data/raw as it was)
        raise data.DataError(os_error_line(err)) from err
    splits = dataset.sequences.groupby("split").size().to_dict()
    per_domain = dataset.items.groupby("domain").size().to_dict()
    print(f"added data/raw/{args.name}/: {dataset.n_items:,} items ({', '.join(f'{d} {n:,}' for d, n in per_domain.items())}), "
          f"examples {', '.join(f'{s} {splits.get(s, 0):,}' for s in ('train', 'valid', 'test'))}")
    report = dataset.provenance.get("import", {})
    dropped = report.get("users_dropped") or report.get("users_without_examples")
    if dropped:
        print(f"  {dropped:,} users left out (fewer interactions than the split rule needs)")
    print(f"\nTo run it, write profiles/{args.name}.yaml (`extends: smoke` instead for a minutes-long check, which runs in "
          "the workspace build/smoke/):\n")
    print("  " + profiles.suggestion(args.name).rstrip("\n").replace("\n", "\n  "))
    print(f"\nthen: tema profile {args.name} && dvc repro")
    return 0


def os_error_line(err: OSError) -> str:
    """An error of the file system in one line naming its path: a tema.atomic.WriteError says it all already."""
    from tema.atomic import WriteError, describe_os_error

    if isinstance(err, WriteError) or not err.filename:
        return " ".join(str(err).split())
    return f"{err.filename}: {describe_os_error(err)}"


DEBUG_ENV = "TEMA_DEBUG"


def error_lines(err: BaseException) -> list[str]:
    """A user mistake as the lines `tema: error: ...` says it in (a missing file as '<path>: not found')."""
    if isinstance(err, FileNotFoundError) and err.filename:
        return [f"{err.filename}: not found"]
    return str(err).splitlines() or [type(err).__name__]


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user mistake (USER_ERRORS, a missing file) ends in `tema: error: <what>` on stderr and exit
    status 2, Ctrl-C in one line and 130; anything else is a bug and shows its traceback. `tema --debug ...` (or
    TEMA_DEBUG=1) shows the traceback of a user mistake too."""
    import traceback

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    try:
        return run_command(argv)
    except (*USER_ERRORS, FileNotFoundError) as err:
        if debug:
            traceback.print_exc()
        for line in error_lines(err):
            print(f"tema: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("tema: interrupted", file=sys.stderr)
        return 130


# Commands whose parser lives in their own module (imported only when they run): their line in `tema --help`.
DELEGATED = {
    "recommend": ("DATASET MODEL USER [options]", "a trained run's top-k items for one user, with the tags shared with the history"),
    "llm": ("serve [options]", "the embedded OpenAI-compatible LLM server, until Ctrl-C"),
}


def command_lines(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, str]]:
    """(usage, one-line description) of every command and subcommand of `parser`, walking its subparsers."""
    out: list[tuple[str, str]] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, sub in action.choices.items():
            path = f"{prefix}{name}"
            if name in DELEGATED and not prefix:
                usage, summary = DELEGATED[name]
                out.append((f"{path} {usage}", summary))
            elif any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                out += command_lines(sub, f"{path} ")
            else:
                positionals = [(a.metavar or a.dest.upper()) + (" ..." if a.nargs in ("+", "*") else "")
                               for a in sub._actions if not a.option_strings]
                options = any(a.option_strings and a.dest != "help" for a in sub._actions)
                out.append((" ".join([path, *positionals, *(["[options]"] if options else [])]), helps.get(name) or ""))
    return out


def known_profiles() -> str:
    try:
        return ", ".join(profiles.known())
    except FileNotFoundError:  # outside the repository: `tema profile --help` still answers
        return "profiles/*.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tema", usage="tema [--debug] <command> [<args>]", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The TEMA study's command: the stages' notebooks (what dvc.yaml runs), parameter profiles, datasets "
                    "of one's own,\nLLM tags, tuning and recommendations.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a user mistake too (or {DEBUG_ENV}=1); give it before the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>", help=argparse.SUPPRESS, prog="tema")

    def command(name: str, summary: str, parent=sub, description: str | None = None) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=summary, description=description or summary)

    prof = command("profile", "write params.yaml for a profile, keeping edits of params.yaml (docs/profiles.md)",
                   description="Write params.yaml from profiles/NAME.yaml (over profiles/default.yaml), with the keys "
                               "dvc.yaml iterates over derived. Values edited in params.yaml since the last `tema profile` "
                               "(by hand or `dvc exp run -S`) are kept over the new profile, one line each says so; "
                               "--reset writes the profile alone (docs/profiles.md).")
    prof.add_argument("name", metavar="NAME", help=f"the profile: {known_profiles()}")
    prof.add_argument("--reset", action="store_true", help="drop the edits of params.yaml: write the profile alone")
    run = command("run-notebook", "execute a notebook with papermill into an ipynb + HTML report (the stages)",
                  description="Execute NOTEBOOK with papermill into OUTPUT (an .ipynb, its .html beside it), stripped of "
                              "what changes from run to run. A failed run's report has a FAILED banner; the command ends "
                              "with the failing cell's error.")
    run.add_argument("notebook", metavar="NOTEBOOK", help="the notebook to run (relative paths from the repository root)")
    run.add_argument("output", metavar="OUTPUT", help="the executed notebook to write, e.g. reports/<dataset>/prepare.ipynb")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="a notebook parameter (VALUE read as YAML); repeatable")
    ds = command("dataset", "datasets of one's own (docs/datasets.md)")
    ds_sub = ds.add_subparsers(dest="dataset_command", required=True, metavar="<command>", prog="tema dataset")
    add = command("add", "vendor a folder (dataset.yaml + CSV/TSV) into data/raw/NAME/, checked", ds_sub,
                  description="Vendor a folder (dataset.yaml + CSV/TSV files) into data/raw/NAME/, checked, with checksums "
                              "and provenance; prints the profile that runs it (docs/datasets.md).")
    add.add_argument("name", metavar="NAME", help="the dataset's name: letters, digits, '-' and '_'")
    add.add_argument("folder", metavar="FOLDER", type=Path, help="a folder with dataset.yaml and the files it names (docs/datasets.md)")
    add.add_argument("--origin", default=None, help="where the data came from (a URL, a citation), recorded in dataset.yaml")
    add.add_argument("--replace", action="store_true", help="replace an existing data/raw/NAME/ (only by data that reads)")
    command("list", "the datasets under data/raw/, their format and domains", ds_sub)
    tags = command("tags", "LLM tag generation outside DVC (long, resumable runs)")
    tags_sub = tags.add_subparsers(dest="tags_command", required=True, metavar="<command>", prog="tema tags")
    gen = command("generate", "LLM tags outside DVC: fill a dataset's answer cache (resumable)", tags_sub)
    gen.add_argument("dataset", metavar="DATASET", help="a dataset of data/raw/ (`tema dataset list`)")
    gen.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each domain")
    gen.add_argument("--all", action="store_true", help="then the LLM refinement and pass 2 too, writing data/tags/<dataset>/ "
                     "as the stage does (its answers cached as well; `dvc repro` then re-runs the stage from the cache)")
    gen.add_argument("--source", metavar="NAME", default=None, help="with --all: the dataset's further tag source NAME "
                     "(tags.other_sources.<dataset>.NAME), written to data/tags/<dataset>/NAME/ as its tags-source stage "
                     "does; default: the dataset's own source")
    tune = command("tune", "hyper-parameter search on validation, the same budget for every model")
    tune.add_argument("dataset", metavar="DATASET", help="a prepared dataset (its prepare and features stages run)")
    tune.add_argument("--models", nargs="+", default=None, help="default: the models of params.yaml")
    tune.add_argument("--trials", type=positive_int, default=None, help="trials per model (default: tune.trials)")
    joint = command("tune-joint", "one configuration per model from several datasets' searches (on validation)")
    joint.add_argument("datasets", metavar="DATASET", nargs="+", help="datasets searched with `tema tune` (reports/tuning/<dataset>.csv)")
    for name, (_, summary) in DELEGATED.items():  # parsed by their own module; here for `tema --help`
        command(name, summary)
    listed = [(f"tema {usage}", summary) for usage, summary in command_lines(parser)]
    width = max(len(usage) for usage, _ in listed)
    parser.description += ("\n\ncommands:\n" + "\n".join(f"  {usage:<{width}}  {summary}" for usage, summary in listed)
                           + "\n\n`tema <command> --help` describes a command's arguments. A mistake (a bad value in params.yaml, "
                           "an unknown dataset,\na missing file) ends in one line `tema: error: ...` and exit status 2; "
                           "Ctrl-C in `tema: interrupted` and 130.")
    return parser


def run_command(argv: list[str]) -> int:
    # Each command imports its stage when it runs, not at the top: `tema profile` and `tema llm` stay quick, and no
    # command pays for torch, papermill or the LLM client it does not use.
    if argv[:1] == ["llm"]:
        from tema.llm import main as llm_main

        return llm_main(argv[1:])
    if argv[:1] == ["recommend"]:
        from tema.recommend import main as recommend_main

        return recommend_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run-notebook":
        from papermill.exceptions import PapermillExecutionError

        from tema.notebook import execute

        try:
            execute(args.notebook, args.output, {k: parse_value(v) for k, v in args.parameter})
        except PapermillExecutionError as err:
            for line in notebook_failure(args.notebook, args.output, err):
                print(f"tema: error: {line}", file=sys.stderr)
            return 1
    elif args.command == "profile":
        for line in apply_profile(args.name, reset=args.reset).lines():
            print(line)
    elif args.command == "dataset":
        return dataset_command(args)
    elif args.command == "tune":
        from tema import datasets
        from tema.tune import run as tune_run

        datasets.spec(args.dataset)  # an unknown dataset: said so, not as a missing prepare output
        table = tune_run(args.dataset, schema.load(), args.models, args.trials)
        print(table.drop(columns=["params"]).to_string(index=False))
        print(f"wrote reports/tuning/{args.dataset}.csv and reports/tuning/{args.dataset}-params.yaml")
    elif args.command == "tune-joint":
        from tema.tune import run_joint

        table = run_joint(args.datasets)
        print(table.drop(columns=["params"]).to_string(index=False))
        print("wrote reports/tuning/joint.csv and reports/tuning/joint-params.yaml")
    elif args.command == "tags":
        import json

        from tema.tags import generate
        from tema.tags import run as run_tags

        if args.all and args.limit is not None:
            parser.error("--all runs the stage's items (tags.limit_items in params.yaml); it takes no --limit")
        if args.source is not None and not args.all:
            parser.error("--source goes with --all (pass 1 alone fills the dataset's answer cache, which all its LLM "
                         "sources share)")
        stop_on_signals()
        try:
            if args.all:  # the stage's own run does pass 1 first: one cache load, one server
                summary = run_tags(args.dataset, schema.load(), args.source)
                print(json.dumps({k: summary["provenance"].get(k) for k in ("refinement", "mapping", "pass2")}, indent=1))
            else:
                print(json.dumps(generate(args.dataset, schema.load(), args.limit), indent=2))
        except KeyboardInterrupt as stop:
            print(f"stopped ({stop}); finished answers are cached, run the same command to resume", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
