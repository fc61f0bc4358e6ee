"""The command table (shared.commands): a command added there reaches the runner's parser, `ilsvrc-canon -h` and the
commands a task may support, and every command has its handler."""

import json
import subprocess
import sys

from shared import cli, runner
from shared.commands import ALL_COMMANDS, COMMANDS, RUNNER_COMMANDS

from conftest import REPO

TABLE_START = "COMMANDS: tuple[Command, ...] = (\n"
NEW_ROW = '    Command("greet", "say hello from a new row", lambda parser: parser.add_argument("--whom")),\n'

# In a fresh interpreter: shared.commands from its source with NEW_ROW added to the table, then its readers.
WITH_A_NEW_ROW = f"""
import contextlib, io, json, sys, types
from pathlib import Path

import shared

path = Path(shared.__file__).parent / "commands.py"
source = path.read_text(encoding="utf-8")
assert source.count({TABLE_START!r}) == 1, "the table's first line moved: update TABLE_START"
table = types.ModuleType("shared.commands")
table.__file__ = str(path)
sys.modules["shared.commands"] = shared.commands = table
exec(compile(source.replace({TABLE_START!r}, {TABLE_START + NEW_ROW!r}), str(path), "exec"), table.__dict__)

from shared import cli, runner

args = runner.parse_args(["greet", "--whom", "world"])
console_help = io.StringIO()
with contextlib.redirect_stdout(console_help), contextlib.suppress(SystemExit):
    cli.main(["-h"])
print(json.dumps({{"parsed": [args.command, args.whom], "runner_help": runner.build_parser().format_help(),
                  "console_help": console_help.getvalue(), "all_commands": sorted(table.ALL_COMMANDS)}}))
"""


def test_a_command_added_to_the_table_reaches_the_runner_the_console_help_and_the_tasks_list():
    result = subprocess.run([sys.executable, "-c", WITH_A_NEW_ROW], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["parsed"] == ["greet", "world"]  # the runner's parser has it, with the row's options
    for listing in ("runner_help", "console_help"):
        assert " greet " in seen[listing] and "say hello from a new row" in seen[listing], seen[listing]
    assert "greet" in seen["all_commands"]


def test_every_runner_command_has_its_handler_and_every_console_command_its_own():
    assert list(runner.HANDLERS) == [command.name for command in RUNNER_COMMANDS]
    assert all(command.arguments for command in RUNNER_COMMANDS)  # their options are the runner's
    assert set(cli.OWN_HANDLERS) == set(cli.OWN_COMMANDS) == {"runs", "prune"}
    assert [*cli.runner_commands(), *cli.OWN_COMMANDS] == [command.name for command in COMMANDS]


def test_tasks_support_commands_of_the_table():
    from shared.tasks import TASKS

    assert TASKS["classification"].commands == ALL_COMMANDS  # every one
    assert ALL_COMMANDS == {command.name for command in RUNNER_COMMANDS} | {"resume"}  # train --resume
    for task in TASKS.values():
        assert task.commands <= ALL_COMMANDS, (task.name, task.commands - ALL_COMMANDS)
