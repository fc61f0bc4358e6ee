import os
import subprocess
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prune_checkpoints.sh"


def make_runs(root: Path, epochs: int = 3, marker: bool = True) -> Path:
    root.mkdir(parents=True)
    if marker:
        (root / ".runs_root").touch()
    for version in ("v0001", "v0002"):
        folder = root / "resnet" / version / "checkpoints"
        folder.mkdir(parents=True)
        for epoch in range(1, epochs + 1):
            (folder / f"epoch-{epoch:04d}.keras").write_bytes(b"x" * 100 * epoch)
    return root


def prune(*args):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def remaining(root: Path) -> dict:
    return {p.parent.name: sorted(c.name for c in p.iterdir())
            for p in sorted(root.glob("*/v*/checkpoints"))}


def test_keeps_the_newest_and_reports_bytes(tmp_path):
    root = make_runs(tmp_path / "runs")
    result = prune(root)
    assert result.returncode == 0, result.stderr
    assert remaining(root) == {"v0001": ["epoch-0003.keras"], "v0002": ["epoch-0003.keras"]}
    assert "freed 600 bytes from 4 checkpoint(s)" in result.stdout  # (100 + 200) x 2 runs
    assert result.stdout.count("removed ") == 4


def test_keep_n(tmp_path):
    root = make_runs(tmp_path / "runs")
    assert prune("--keep", 2, root).returncode == 0
    assert remaining(root)["v0001"] == ["epoch-0002.keras", "epoch-0003.keras"]


def test_dry_run_removes_nothing(tmp_path):
    root = make_runs(tmp_path / "runs")
    result = prune("--dry-run", root)
    assert result.returncode == 0
    assert "would remove" in result.stdout and "would free 600 bytes" in result.stdout
    assert remaining(root)["v0002"] == ["epoch-0001.keras", "epoch-0002.keras", "epoch-0003.keras"]


def test_never_removes_the_last_checkpoint(tmp_path):
    root = make_runs(tmp_path / "runs", epochs=1)
    assert prune(root).returncode == 0
    assert remaining(root) == {"v0001": ["epoch-0001.keras"], "v0002": ["epoch-0001.keras"]}
    result = prune("--keep", 0, root)
    assert result.returncode == 2 and "--keep must be a whole number of at least 1" in result.stderr


def test_refuses_folders_that_are_not_runs_roots(tmp_path):
    root = make_runs(tmp_path / "elsewhere", marker=False)
    result = prune(root)
    assert result.returncode == 2 and "refusing to prune" in result.stderr
    assert remaining(root)["v0001"] == ["epoch-0001.keras", "epoch-0002.keras", "epoch-0003.keras"]
    assert prune(tmp_path / "missing").returncode == 2


def test_does_not_follow_links_out_of_the_root(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    for epoch in (1, 2):
        (outside / f"epoch-{epoch:04d}.keras").write_text("keep me")
    root = make_runs(tmp_path / "runs", epochs=1)
    (root / "resnet" / "v0003").mkdir()
    (root / "resnet" / "v0003" / "checkpoints").symlink_to(outside)
    assert prune(root).returncode == 0
    assert sorted(p.name for p in outside.iterdir()) == ["epoch-0001.keras", "epoch-0002.keras"]


def test_keep_counts_are_decimal_whatever_the_leading_zeros(tmp_path):
    root = make_runs(tmp_path / "runs", epochs=9)
    result = prune("--keep", "010", root)  # ten, not octal eight: all nine stay
    assert result.returncode == 0, result.stderr
    assert len(remaining(root)["v0001"]) == 9
    result = prune("--keep", "08", root)  # eight; bash arithmetic would reject 08 as octal
    assert result.returncode == 0, result.stderr
    assert remaining(root)["v0001"] == [f"epoch-{epoch:04d}.keras" for epoch in range(2, 10)]
    assert prune("--keep=000", root).returncode == 2


def failing(bin_dir: Path, command: str, script: str) -> dict:
    """A PATH on which `command` is a shell script that fails as the real one does in `script`'s case."""
    bin_dir.mkdir(exist_ok=True)
    real = subprocess.run(["bash", "-c", f"command -v {command}"], capture_output=True, text=True).stdout.strip()
    shim = bin_dir / command
    shim.write_text(f'#!/bin/sh\nREAL="{real}"\n{script}\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_a_failing_find_is_an_error(tmp_path):
    # e.g. a run folder it may not read: find lists the rest and exits 1; the script must not go on.
    root = make_runs(tmp_path / "runs")
    env = failing(tmp_path / "bin", "find",
                  '"$REAL" "$@"; echo "find: \'runs/resnet/v0003\': Permission denied" >&2; exit 1')
    result = subprocess.run(["bash", str(SCRIPT), str(root)], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "error: could not list" in result.stderr
    assert "freed" not in result.stdout
    assert remaining(root)["v0001"] == ["epoch-0001.keras", "epoch-0002.keras", "epoch-0003.keras"]


@pytest.mark.parametrize("command, error", [("rm", "error: could not remove"),
                                             ("stat", "error: cannot read the size of")])
def test_a_failing_rm_or_stat_is_an_error(tmp_path, command, error):
    # A checkpoint that cannot be removed or read (a read-only or failing file system); other files as usual.
    root = make_runs(tmp_path / "runs")
    env = failing(tmp_path / "bin", command, f'case "$*" in *epoch-*.keras*) echo "{command}: $*: Input/output '
                                             f'error" >&2; exit 1;; esac; exec "$REAL" "$@"')
    result = subprocess.run(["bash", str(SCRIPT), str(root)], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and error in result.stderr
    assert "freed" not in result.stdout and "removed" not in result.stdout


def test_checkpoints_sort_by_epoch_number_not_as_text(tmp_path):
    """Four padded digits run out at epoch 9999: epoch-10000.keras is the newest, though it sorts first as text.
    A name that is not epoch-N.keras is no checkpoint and stays."""
    root = make_runs(tmp_path / "runs", epochs=0)
    folder = root / "resnet" / "v0001" / "checkpoints"
    for name in ("epoch-9998.keras", "epoch-9999.keras", "epoch-10000.keras", "epoch-best.keras"):
        (folder / name).write_bytes(b"x")
    result = prune(root)
    assert result.returncode == 0, result.stderr
    assert remaining(root)["v0001"] == ["epoch-10000.keras", "epoch-best.keras"]
    assert "freed 2 bytes from 2 checkpoint(s)" in result.stdout
