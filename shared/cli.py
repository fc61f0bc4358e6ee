"""The console command `ilsvrc-canon` that `pip install` puts on the PATH ([project.scripts] in pyproject.toml).

    ilsvrc-canon --config models/resnet/quick.yaml        # options without a command: train, as the runner does
    ilsvrc-canon test --run runs/resnet/v0003             # every subcommand of `python -m shared.runner`
    ilsvrc-canon runs list [resnet]                       # python -m shared.runs list|diff
    ilsvrc-canon prune [--keep N] [--dry-run] [runs]      # scripts/prune_checkpoints.sh
    ilsvrc-canon --version

No parser of its own for the commands: they and their help come from the command table (`shared.commands`, so a
command added there appears here), and each command line goes whole to `shared.runner.main`, `shared.runs.main` or
the prune script, which parse it. `python -m shared.runner` remains the documented entry point.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib import metadata, resources

from shared import runner
from shared.commands import COMMANDS

PROG = "ilsvrc-canon"
PRUNE_SCRIPT = "prune_checkpoints.sh"  # package data of `shared` (pyproject.toml [tool.setuptools.package-data])
# The console's own commands (the table's rows the runner does not have), with their one-line help
OWN_COMMANDS = {command.name: command.help for command in COMMANDS if not command.runner}


def runner_commands() -> dict[str, str]:
    """The runner's subcommands, each with its one-line help, in the table's order."""
    return {command.name: command.help for command in COMMANDS if command.runner}


def version() -> str:
    try:
        return metadata.version("ilsvrc-canon")
    except metadata.PackageNotFoundError:  # a checkout used without `pip install -e .`
        return "unknown (not installed; pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train, test, export and manage runs of the canonical ILSVRC classifiers.",
        epilog=f"`{PROG} COMMAND -h` shows a command's options. Options without a command mean train "
               f"(`{PROG} --config models/resnet/quick.yaml`), as with `python -m shared.runner`.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        commands.add_parser(command.name, help=command.help, add_help=False)  # the command's own parser answers -h
    return parser


def prune(argv: list[str]) -> int:
    """Run the packaged prune script (bash; it needs flock from util-linux) and return its exit status."""
    with resources.as_file(resources.files("shared") / PRUNE_SCRIPT) as script:
        try:
            return subprocess.run(["bash", str(script), *argv],
                                  env={**os.environ, "PRUNE_PROG": f"{PROG} prune"}).returncode
        except KeyboardInterrupt:  # bash got the same Ctrl-C and stops on its own
            return 130


def _runs(argv: list[str]) -> int:
    # Imported here, not above: shared.runs needs PyYAML, and prune and -h need nothing but this package.
    from shared import runs

    return runs.main(argv, prog=f"{PROG} runs")


# How the console runs its own commands (OWN_COMMANDS); every other command line goes whole to the runner.
OWN_HANDLERS = {"runs": _runs, "prune": prune}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        return runner.main(argv, prog=PROG)  # the runner's default command, train
    command = build_parser().parse_args(argv[:1]).command  # -h, --version, a missing or unknown command: argparse
    if command in OWN_HANDLERS:
        return OWN_HANDLERS[command](argv[1:])
    return runner.main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
