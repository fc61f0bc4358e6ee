"""The installed console command `ilsvrc-canon` ([project.scripts] in pyproject.toml), run as a user runs it, and
progress output that suits a terminal, a log and NO_COLOR (shared.progress)."""

import fcntl
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from shared import cli, runner, runs
from shared.progress import keras_verbosity, no_color, progress_bar

import forked
from conftest import REPO
from test_prune import make_runs, remaining

CONSOLE = Path(sys.executable).parent / "ilsvrc-canon"  # where pip puts the console script of this environment
COLOUR = re.compile(rb"\x1b\[[0-9;]*m")  # an ANSI colour or bold code


def console(*argv, **kwargs) -> subprocess.CompletedProcess:
    assert CONSOLE.is_file(), f"{CONSOLE} is missing: `pip install -e .` installs the console command"
    return subprocess.run([str(CONSOLE), *map(str, argv)], capture_output=True, text=True, timeout=120, **kwargs)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_version_is_the_package_metadata():
    result = console("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ilsvrc-canon {metadata.version('ilsvrc-canon')}\n"


def test_help_lists_the_runners_commands_with_their_help_then_runs_and_prune():
    commands = cli.runner_commands()
    assert list(commands) == list(runner.HANDLERS) and all(commands.values())  # derived, with every help line
    result = console("-h")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps the help column
    for name, summary in {**commands, **cli.OWN_COMMANDS}.items():
        assert f" {name} {' '.join(summary.split())}" in text, name


def test_options_without_a_command_mean_train_as_in_the_runner(tmp_path):
    missing = tmp_path / "nope.yaml"
    line = one_error_line(console("--config", missing))
    assert "config file not found" in line and "nope.yaml" in line
    module = subprocess.run([sys.executable, "-m", "shared.runner", "--config", str(missing)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert module.returncode == 2 and module.stderr.splitlines() == [line]


def test_an_unknown_or_missing_command_is_argparses_usage_error():
    result = console("trian")
    assert result.returncode == 2 and not result.stdout
    assert "ilsvrc-canon: error: argument COMMAND: invalid choice: 'trian'" in result.stderr
    assert "Traceback" not in result.stderr
    result = console()
    assert result.returncode == 2 and "the following arguments are required: COMMAND" in result.stderr
    result = console("train", "--bogus")  # the runner's own parser, under the console command's name
    assert result.returncode == 2 and "usage: ilsvrc-canon" in result.stderr
    assert "unrecognized arguments: --bogus" in result.stderr


def test_a_user_mistake_is_one_line_and_status_2(tmp_path):
    assert one_error_line(console("test", "--run", tmp_path / "nowhere")).startswith("error: no run at ")
    line = one_error_line(console("runs", "list", "ghost", "--dir", tmp_path))
    assert line == f"error: no runs of model 'ghost' in {tmp_path}"


def test_runs_list_and_diff_on_a_runs_root(tmp_path):
    root = tmp_path / "runs"
    for epochs in (1, 2):
        path = runs.allocate(root, "resnet")
        (path / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "resnet"}, "train": {"epochs": epochs}}))
        runs.Run(path).set_status("finished")
        runs.Run(path).write_json("test_metrics.json", {"top1": 0.25 * epochs})
    result = console("runs", "list", "--dir", root)
    assert result.returncode == 0, result.stderr
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["run", "status", "top1", "train.epochs"],
        ["resnet/v0001", "finished", "0.2500", "1"], ["resnet/v0002", "finished", "0.5000", "2"]]
    result = console("runs", "diff", root / "resnet" / "v1", root / "resnet" / "v2")
    assert result.returncode == 0 and "-  epochs: 1" in result.stdout and "+  epochs: 2" in result.stdout


def test_prune_runs_the_packaged_script(tmp_path):
    root = make_runs(tmp_path / "runs")
    result = console("prune", "--dry-run", root)
    assert result.returncode == 0, result.stderr
    assert "would free 600 bytes from 4 checkpoint(s)" in result.stdout
    assert remaining(root)["v0001"] == ["epoch-0001.keras", "epoch-0002.keras", "epoch-0003.keras"]
    assert console("prune", "-h").stdout.startswith("usage: ilsvrc-canon prune [--keep N]")
    result = console("prune", "--keep", "0", root)
    assert result.returncode == 2 and "--keep must be a whole number" in result.stderr


def test_python_m_shared_runner_still_answers():
    result = subprocess.run([sys.executable, "-m", "shared.runner", "-h"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m shared.runner")
    assert all(name in result.stdout for name in runner.HANDLERS)


@pytest.mark.slow
def test_the_wheel_installs_the_command_and_the_prune_script(tmp_path):
    # A real build of the package as pip would install it (not the editable checkout, which has scripts/ too).
    source = tmp_path / "source"
    shutil.copytree(REPO / "shared", source / "shared", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("ilsvrc_canon-*.whl")))
    entry_points = next(name for name in wheel.namelist() if name.endswith(".dist-info/entry_points.txt"))
    assert "ilsvrc-canon = shared.cli:main" in wheel.read(entry_points).decode()
    installed = tmp_path / "site"
    wheel.extractall(installed)
    root = make_runs(tmp_path / "runs")
    # -S: no site-packages, so neither this checkout's editable install nor anything but the wheel's files
    result = subprocess.run([sys.executable, "-S", "-c", "import sys, shared.cli; print(shared.cli.__file__); "
                             "sys.exit(shared.cli.main())", "prune", "--dry-run", str(root)],
                            capture_output=True, text=True, cwd=installed, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(installed / "shared" / "cli.py"))
    assert "would free 600 bytes" in result.stdout


# ---------------------------------------------------------------- progress output


def test_no_bar_off_a_terminal_even_when_asked_for(capfd):
    for _ in progress_bar(range(5), desc="counting", disable=False, mininterval=0):
        pass
    assert capfd.readouterr().err == ""
    assert keras_verbosity(1) == 2 and keras_verbosity(0) == 0  # captured stdout is no terminal


def test_writing_tfrecords_draws_no_bar_into_a_log(tmp_path, capfd):
    from PIL import Image

    from shared.data.tfrecord import write_shards

    files = []
    for i in range(2):
        files.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (4, 4), (i * 100, 0, 0)).save(files[-1])
    write_shards(files, [0, 1], None, tmp_path / "shards", "train", 1, progress=True)  # asks for a bar
    out, err = capfd.readouterr()
    assert "train shards" not in err and "\r" not in err + out and not COLOUR.search((out + err).encode())


def test_no_color_is_set_only_by_a_non_empty_value(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "")
    assert not no_color()  # https://no-color.org: "present and not an empty string"
    monkeypatch.setenv("NO_COLOR", "0")
    assert no_color()


def in_terminal(code: str, no_color: str | None, timeout: float = 300, start=subprocess.Popen) -> bytes:
    """What `python -c code` writes to a terminal (a pseudo-terminal of 80 columns), NO_COLOR set or not;
    `start`: forked.popen for code that imports TensorFlow (no new interpreter to pay for)."""
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    if no_color is not None:
        env["NO_COLOR"] = no_color
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # tqdm sizes its bar by it
    child = start([sys.executable, "-c", code], stdin=follower, stdout=follower, stderr=follower, cwd=REPO, env=env)
    os.close(follower)
    output = b""
    try:
        while select.select([leader], [], [], timeout)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        os.close(leader)
    assert child.returncode == 0, output.decode(errors="replace")
    return output


BARS_AND_LOGS = """
from shared.progress import keras_verbosity, progress_bar
for _ in progress_bar(range(3), desc="counting", mininterval=0):
    pass
print("keras verbose", keras_verbosity(1))
import optuna
optuna.logging.get_logger("optuna").info("a trial finished")
"""


@pytest.mark.parametrize("no_color", [None, "1"])
def test_in_a_terminal_bars_show_and_no_color_takes_the_colour_away(no_color):
    output = in_terminal(BARS_AND_LOGS, no_color)
    assert b"counting: 100%" in output  # tqdm draws, uncoloured, either way
    log = next(line for line in output.splitlines() if b"a trial finished" in line)
    if no_color:
        assert b"keras verbose 2" in output  # Keras colours its bar: one plain line per epoch instead
        assert not COLOUR.search(output)
    else:
        assert b"keras verbose 1" in output
        assert COLOUR.search(log)  # Optuna's log colours (colorlog) on a terminal, so the test above can fail


TRAINING_IN_A_TERMINAL = """
import os, sys
sys.path.insert(0, "tests")
import keras, numpy as np
from pathlib import Path
from conftest import TINY_MODEL, tiny_tree
from shared.config import load_config
from shared.lifecycle import train
from shared.progress import keras_verbosity

model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
model.compile("sgd", "mse")
model.fit(np.zeros((4, 2)), np.zeros((4, 1)), batch_size=2, epochs=1, verbose=keras_verbosity(1))
print("=== NO_COLOR ===", flush=True)
os.environ["NO_COLOR"] = "1"
tree = tiny_tree(sys.argv[1], train={"epochs": 1, "verbose": 1})
folder = Path(sys.argv[1]).parent / "one_conv_model"  # one convolution: the printing is checked, not the model
folder.mkdir(parents=True)
(folder / "model.py").write_text(TINY_MODEL)
tree["model"] = {"name": "tiny", "path": str(folder)}
tree["data"].update(synthetic_train=64, synthetic_test=32)
train(load_config(tree=tree), argv=["test"])
"""


@pytest.mark.slow
def test_training_in_a_terminal_has_no_colour_under_no_color(tmp_path):
    code = TRAINING_IN_A_TERMINAL.replace("sys.argv[1]", repr(str(tmp_path / "runs")))
    plain, _, no_color = in_terminal(code, None, start=forked.popen).partition(b"=== NO_COLOR ===")
    assert COLOUR.search(plain)  # Keras' bar on a terminal is coloured
    assert re.search(rb"2/2 - \d+s", no_color), no_color  # the one line per epoch of verbose=2
    assert not COLOUR.search(no_color), no_color


# ---------------------------------------------------------------- what a training command prints


def test_the_closing_line_lists_what_the_run_folder_holds_and_the_next_commands(tmp_path):
    from shared.tasks import TASKS

    run = runs.Run(tmp_path / "my runs" / "v0001")
    (run.path / "split").mkdir(parents=True)
    for name in ("errors.png", "confusion.png", "curves.png"):
        (run.path / name).write_bytes(b"png")
    quoted = f"'{run.path}'"  # a path with a space, ready to paste
    assert runner.closing_line(run, TASKS["classification"]) == (
        f"run folder {quoted}: curves.png, confusion.png, errors.png, split/ (the split's file lists); next: "
        f"`python -m shared.runner test --run {quoted}`, `python -m shared.runner predict --run {quoted} IMAGES`, "
        f"`python -m shared.runner export --run {quoted} --format saved_model`")
    bare = runs.Run(tmp_path / "bare")
    bare.path.mkdir()
    assert runner.closing_line(bare, TASKS["deblur"], "ilsvrc-canon") == (  # deblur runs do not predict
        f"run folder {bare.path}: no figures; next: `ilsvrc-canon test --run {bare.path}`, "
        f"`ilsvrc-canon export --run {bare.path} --format saved_model`")


@pytest.mark.slow
def test_training_prints_no_tensorflow_start_up_lines_and_closes_with_the_run_folder(tmp_path):
    """As a user runs it, with no TF_CPP_MIN_LOG_LEVEL of their own: stderr holds none of TensorFlow's C++ lines
    (no "failed call to cuInit" on a CPU machine), and the last line says what to look at and do next."""
    from conftest import TINY_MODEL
    from test_own_folders import make_class_folders

    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model.py").write_text(TINY_MODEL)
    tree = {"model": {"name": "tiny", "path": str(tmp_path / "tiny")},
            "data": {"source": "folder", "path": str(make_class_folders(tmp_path / "photos", {"cat": 6, "dog": 6})),
                     "image_size": 12, "channels": 3, "test_fraction": 0.5},
            "train": {"epochs": 1, "batch_size": 8, "verbose": 0}, "run": {"dir": str(tmp_path / "runs")}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    environment = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}  # conftest's
    result = console("--config", tmp_path / "recipe.yaml", env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cuInit" not in result.stderr and "CUDA" not in result.stderr and "absl" not in result.stderr
    assert not re.search(r"^[IWEF]\d{4} \S+ +\d+ \S+:\d+\]", result.stderr, re.M), result.stderr
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert result.stdout.splitlines()[-1] == (
        f"run folder {run_dir}: curves.png, confusion.png, errors.png, split/ (the split's file lists); next: "
        f"`ilsvrc-canon test --run {run_dir}`, `ilsvrc-canon predict --run {run_dir} IMAGES`, "
        f"`ilsvrc-canon export --run {run_dir} --format saved_model`")
