"""The run store: every run is a folder `<runs root>/<model>/<version>/` that holds everything needed to
know, rebuild and re-test it:

    model.py (+ augment.py)  the model source that built it, copied at start
    notes.md                 the run's notes, then the model folder's notes
    config.yaml              the fully resolved config, in stable key order
    labels.txt               the class names, one per line, in class-index order
    imported.json            a run of imported weights (`create_imported`): the source file, its SHA-256, the mapping
    environment.json         package versions, git commit and dirtiness, command line, machine
    status.json              running / finished / failed, with times and the error
    run.lock                 who trains it (pid, host, start, command); flock-held while that process lives
    metrics.csv              one row per epoch (Keras CSVLogger)
    test_metrics.json        the held-out evaluation after training
    checkpoints/             epoch-NNNN.keras (model + optimizer state); the newest is the run's last
                             best.keras: the best epoch's (train.best), `Run.checkpoint("best")`
    logs/                    TensorBoard

Versions are v0001, v0002, ... (zero-padded so `ls` sorts them), allocated with an atomic mkdir so
concurrent runs never share a folder. `python -m shared.runs list|diff` reads the store; `log-to-mlflow` logs a
run to MLflow (shared/mlflow_log.py).

A training process holds an exclusive flock on its run's `run.lock` for as long as it trains (`lock_run`);
the kernel drops it when the process dies, so a killed run's lock is stale and the next taker simply takes
it over. Readers (test, export, size, finetune --from, a distillation teacher) call `require_idle` and are
refused with one line while the run is live.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import dataclasses
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from shared.config_schema import Config
from shared.config_yaml import UnreadableYaml, read_yaml_file
from shared.durable import atomic_write, partial_path
from shared import locks
from shared.errors import UserError, run_cli
from shared.modelzoo import PROJECT_ROOT

ROOT_MARKER = ".runs_root"  # marks a runs root; scripts/prune_checkpoints.sh refuses folders without it
LOCK_FILE = "run.lock"
LOCK_WAIT_SECONDS = 2.0  # a reader's probe or a prune holds the lock briefly; a trainer waits that out
VERSION_RE = re.compile(r"^v(\d+)$")
CHECKPOINT_RE = re.compile(r"^epoch-(\d+)\.keras$")  # checkpoints/epoch-NNNN.keras: N is the epoch
VERSION_DIGITS = 4
SNAPSHOT_SOURCES = ("model.py", "augment.py")
LABELS_FILE = "labels.txt"
IMPORTED_FILE = "imported.json"  # a run made from weights trained elsewhere: where they came from, how they map
BEST_CHECKPOINT = "best.keras"  # in checkpoints/: the best epoch's checkpoint (train.best)
DIFF_FILES = ("model.py", "augment.py", "config.yaml", "notes.md")
PACKAGES = ("tensorflow", "keras", "numpy", "pillow", "pyyaml", "tensorflow-datasets", "tqdm")


@dataclass
class Run:
    path: Path

    @property
    def model_name(self) -> str:
        return self.path.parent.name

    @property
    def version(self) -> str:
        return self.path.name

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary files of an interrupted save are skipped)."""
        return epoch_checkpoints(self.checkpoint_dir)

    def last_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint(self, which: str | Path = "last") -> Path:
        """The checkpoint a command asks for: `last` (the newest epoch checkpoint), `best` (checkpoints/best.keras,
        kept by train.best) or a file (a path as given, else relative to the run folder); UserError in one
        line when it is not there."""
        if str(which) == "last":
            last = self.last_checkpoint()
            if last is None:
                raise UserError(self._no_checkpoint())
            return last
        if str(which) == "best":
            best = self.checkpoint_dir / BEST_CHECKPOINT
            if not best.is_file():
                raise UserError(f"run {self.path} has no checkpoints/{BEST_CHECKPOINT}; set train.best.monitor "
                                f"(e.g. val_top1, with data.val_fraction) when training to keep one, or use "
                                f"--checkpoint last")
            return best
        for path in (Path(which).expanduser(), self.path / which):
            if path.is_file():
                return path
        raise UserError(f"checkpoint {which} not found (nor in {self.path}); give last, best or a .keras file")

    def _no_checkpoint(self) -> str:
        """Why there is no last checkpoint, and what to do: a run that stopped before its first epoch ended
        says so, with its error."""
        state = shown_status(self)
        if state in ("failed", "interrupted", "crashed"):
            error = (str(self.status().get("error") or "").splitlines() or [""])[0][:200]
            return (f"run {self.path} has no checkpoint: it {state} before its first epoch ended"
                    f"{f' ({error})' if error else ''}; {'fix that, then ' if error else ''}resume it "
                    f"(python -m shared.runner --resume {self.path}) or train a new run")
        return f"run {self.path} has no checkpoint in {self.checkpoint_dir} (status: {state}); train it first"

    def status(self) -> dict:
        try:
            return json.loads((self.path / "status.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"status": "unknown"}

    def set_status(self, status: str, **details) -> None:
        record = {**self.status(), "status": status, **details}
        if status != "failed":
            record.pop("error", None)
        record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write(self.path / "status.json", json.dumps(record, indent=2) + "\n")
        if status != "running":
            unlock_run(self)  # training has ended: readers may have the run

    def config_dict(self) -> dict:
        """The run's config.yaml as read; a damaged one is a UserError naming the file and the line."""
        path = self.path / "config.yaml"
        try:
            tree = read_yaml_file(path)
        except UnreadableYaml as why:
            fix = "fix that line or restore the file from a copy" if why.where else \
                "restore the run's config.yaml from a copy"
            raise UserError(f"{path} is damaged{why.where}: {why.problem}; {fix}") from None
        if not isinstance(tree, dict):
            raise UserError(f"{path} is damaged: it holds {type(tree).__name__}, not the run's config sections; "
                            f"restore the run's config.yaml from a copy")
        return tree

    def class_names(self) -> list[str] | None:
        """The class names in index order (runs from before labels.txt existed: None)."""
        path = self.path / LABELS_FILE
        return path.read_text(encoding="utf-8").splitlines() if path.is_file() else None

    def imported(self) -> dict | None:
        """imported.json of a run of weights trained elsewhere (`create_imported`); None for a trained run."""
        path = self.path / IMPORTED_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def test_metrics(self) -> dict | None:
        path = self.path / "test_metrics.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def write_json(self, name: str, payload: dict) -> None:
        atomic_write(self.path / name, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def epoch_checkpoints(folder: Path) -> list[Path]:
    """The epoch checkpoints in `folder` (`epoch-N.keras`), oldest first: by epoch number, not as text, so
    epoch-10000 comes after epoch-9999 when the four padded digits run out."""
    found = [(int(match.group(1)), path) for path in Path(folder).glob("epoch-*.keras")
             if (match := CHECKPOINT_RE.match(path.name))]
    return [path for _, path in sorted(found)]


# ---------------------------------------------------------------- creating runs


def runs_root(directory: str | Path) -> Path:
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / ROOT_MARKER).touch()
    return root


def allocate(root: Path, model_name: str) -> Path:
    """Create the next free version folder. mkdir is atomic: if another process takes the same number
    first, ours fails with FileExistsError and we move on to the next."""
    model_dir = runs_root(root) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(m.group(1)) for p in model_dir.iterdir() if (m := VERSION_RE.match(p.name))]
        candidate = model_dir / f"v{max(taken, default=0) + 1:0{VERSION_DIGITS}d}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def environment(argv: list[str] | None = None) -> dict:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    git = {}
    try:
        def run_git(*args):
            return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        git = {"commit": run_git("rev-parse", "HEAD"), "dirty": bool(run_git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        git = {"commit": None, "dirty": None}
    return {
        "command": " ".join([Path(sys.executable).name, *(argv if argv is not None else sys.argv)]),
        "cwd": os.getcwd(), "python": platform.python_version(), "platform": platform.platform(),
        "host": socket.gethostname(), "packages": versions, "git": git,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def create(config, model_folder: Path, argv: list[str] | None = None, provenance: str = "") -> Run:
    """Allocate a version and snapshot the model source, notes, resolved config and environment.
    `provenance`: where the starting weights came from, recorded in the notes."""
    run = Run(allocate(Path(config.run.dir), config.model.name))
    lock_run(run, argv)  # before the first write: nobody may take a folder that is being filled
    for name in SNAPSHOT_SOURCES:
        if (model_folder / name).is_file():
            shutil.copy2(model_folder / name, run.path / name)
    model_notes = model_folder / "notes.md"
    notes = [f"# {config.model.name} {run.version}", ""]
    if config.run.notes.strip():
        notes += [config.run.notes.strip(), ""]
    if provenance:
        notes += [f"Starting weights: {provenance}", ""]
    if model_notes.is_file():
        notes += ["---", f"Model notes ({model_notes.name} at the time of the run):", "",
                  model_notes.read_text(encoding="utf-8")]
    atomic_write(run.path / "notes.md", "\n".join(notes).rstrip() + "\n")
    atomic_write(run.path / "config.yaml", config.dump())
    run.write_json("environment.json", environment(argv))
    run.checkpoint_dir.mkdir()
    run.set_status("running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), pid=os.getpid())
    return run


def create_imported(config, model_folder: Path, model, class_names: list[str], record: dict,
                    argv: list[str] | None = None) -> Run:
    """A finished run of weights trained elsewhere, which every command takes like a trained run: the snapshot
    `create` writes, labels.txt, `record` (the source file, its SHA-256, the mapping) as imported.json and the
    model as the checkpoint of epoch 0, each written durably under the run's lock. A failure part-way marks the
    run failed (Ctrl-C: interrupted); no checkpoint is left half-written."""
    run = create(config, model_folder, argv, provenance=f"{record['source']} weights from {record['file']} "
                                                       f"(sha256 {record['sha256']}), imported ({IMPORTED_FILE})")
    try:
        atomic_write(run.path / LABELS_FILE, "".join(f"{name}\n" for name in class_names))
        run.write_json(IMPORTED_FILE, record)
        with partial_path(run.checkpoint_dir / f"epoch-{0:0{VERSION_DIGITS}d}.keras") as partial:
            model.save(partial)
    except KeyboardInterrupt:
        run.set_status("interrupted")
        raise
    except BaseException as error:
        run.set_status("failed", error=f"{type(error).__name__}: {error}")
        raise
    run.set_status("finished", ended=time.strftime("%Y-%m-%dT%H:%M:%S"), imported=record["source"])
    return run


def scratch() -> Run:
    """A throwaway run folder for a non-chief worker of a multi-worker job: it saves (saving takes
    part in collective ops) but only the chief's run folder is kept."""
    run = Run(Path(tempfile.mkdtemp(prefix="worker-run-")))
    run.checkpoint_dir.mkdir()
    return run


def open_run(path: str | Path) -> Run:
    """A run folder, accepting short versions (runs/resnet/v3 for v0003)."""
    path = Path(path)
    if not path.is_dir():
        match = VERSION_RE.match(path.name)
        if match:
            padded = path.parent / f"v{int(match.group(1)):0{VERSION_DIGITS}d}"
            if padded.is_dir():
                path = padded
    if not (path / "config.yaml").is_file():
        raise UserError(f"no run at {path} (a run folder holds config.yaml); "
                        f"`python -m shared.runs list` shows the runs there are")
    return Run(path)


def all_runs(root: Path, model: str | None = None) -> list[Run]:
    root = Path(root)
    models = [root / model] if model else sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [Run(p) for m in models if m.is_dir()  # by version number: v10000 after v9999
            for p in sorted((p for p in m.iterdir() if VERSION_RE.match(p.name) and p.is_dir()),
                            key=lambda p: int(VERSION_RE.match(p.name).group(1)))]


# ---------------------------------------------------------------- the training lock


class RunInUse(UserError):
    """Another live process trains the run."""


def _run_lock(run: Run) -> locks.FileLock:
    return locks.FileLock(run.path / LOCK_FILE)


def lock_run(run: Run, argv: list[str] | None = None) -> None:
    """Hold the run's lock until `unlock_run` or the end of this process; RunInUse if another live process
    holds it. A lock left by a dead process is taken over. Taking it again in the holding process is a no-op."""
    lock = _run_lock(run)
    if lock.held_here:
        return
    if not lock.acquire(blocking=False, wait_seconds=LOCK_WAIT_SECONDS, argv=argv):
        raise RunInUse(in_use_message(run, locks.holder_record(lock.path)))


def unlock_run(run: Run) -> None:
    """Let go of the run's lock if this process holds it (run.lock stays: it names the last trainer)."""
    lock = _run_lock(run)
    while lock.held_here:
        lock.release()


def lock_holder(run: Run) -> dict | None:
    """The lock record of the live process that trains the run (this one included), or None."""
    return locks.holder(run.path / LOCK_FILE)


def require_idle(run: Run) -> None:
    """RunInUse (one line naming the process) if another live process trains the run: its checkpoints and
    files are still being written."""
    if _run_lock(run).held_here:
        return
    record = lock_holder(run)
    if record is not None:
        raise RunInUse(in_use_message(run, record))


def in_use_message(run: Run, record: dict) -> str:
    return (f"run {run.path} is in use by {locks.describe(record)}; wait until it ends or stop it "
            f"(kill {record.get('pid', 'its process')}), then try again")


def shown_status(run: Run) -> str:
    """status.json's status, except that a run marked running whose lock no process holds is `crashed`."""
    status = run.status().get("status", "unknown")
    return "crashed" if status == "running" and lock_holder(run) is None else status


# ---------------------------------------------------------------- list


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


LIST_COLUMNS = ("run", "status", "top1", "views", "notes")  # besides config keys (dotted), what --columns may name
# differing keys shown first to last, as far as the width allows: the tasks' own sections between these
FIRST_SECTIONS, LAST_SECTIONS = ("model", "train", "data", "init", "distill"), ("loop", "tune", "distribute", "run")
SECTION_ORDER = (*FIRST_SECTIONS, *(field.name for field in dataclasses.fields(Config)
                                    if dataclasses.is_dataclass(field.default_factory)
                                    and field.name not in FIRST_SECTIONS + LAST_SECTIONS), *LAST_SECTIONS)
CELL_WIDTH = 24  # a config value's cell at most (longer values end in ...)
NOTES_MIN_WIDTH = 12  # narrower than this, the notes are left out rather than cut to nothing


def table(runs: list[Run], width: int | None = None, columns: list[str] | None = None) -> str:
    """Version, status, test top-1, the config keys whose values differ between these runs, and the run's notes
    (its first line), fitted to `width` characters (None: no limit): notes are cut to the width left, and the
    differing keys that do not fit are named on a last line instead of shown. `columns` chooses the columns
    instead (LIST_COLUMNS or dotted config keys), in that order; only the notes are then cut to fit. A config
    value longer than CELL_WIDTH ends in ..."""
    if not runs:
        return "no runs"
    configs = []
    for run in runs:
        try:
            configs.append(_flatten(run.config_dict()))
        except (OSError, UserError):
            configs.append(None)  # a damaged config.yaml: listed, but it takes no part in what differs
    readable = [config for config in configs if config is not None]
    keys = sorted({k for c in readable for k in c}, key=_key_order)
    differing = [k for k in keys if k != "run.notes" and len({json.dumps(c.get(k)) for c in readable}) > 1]
    if columns is not None:
        unknown = [name for name in columns if name not in LIST_COLUMNS and name not in keys]
        if unknown:
            raise UserError(f"--columns names {unknown[0]!r}, which is neither a column ({', '.join(LIST_COLUMNS)}) "
                            f"nor a config key of these runs (e.g. {', '.join(differing[:3] or keys[:3])})")
    cells = [_row(run, config) for run, config in zip(runs, configs)]
    chosen = list(columns) if columns is not None else ["run", "status", "top1"] + (
        ["views"] if any(row["views"] != "-" for row in cells) else [])
    left_out: list[str] = []
    if columns is None:
        notes_width = min(NOTES_MIN_WIDTH, max(len(row["notes"]) for row in cells)) if any(
            row["notes"] for row in cells) else 0
        for key in differing:
            if width is None or _width([*chosen, key], cells) + (notes_width + 2 if notes_width else 0) <= width:
                chosen.append(key)
            else:
                left_out.append(key)
        if notes_width:
            chosen.append("notes")
    lines = _lines(chosen, cells, width)
    if left_out:
        lines.append(_cut(f"{len(left_out)} more differing key(s), not shown: {', '.join(left_out)} "
                          f"(--columns chooses the columns)", width))
    return "\n".join(lines)


def _key_order(key: str) -> tuple:
    section = key.split(".")[0]
    return (SECTION_ORDER.index(section) if section in SECTION_ORDER else len(SECTION_ORDER), key)


def _row(run: Run, config: dict | None) -> dict[str, str]:
    """A run's cells by column name (config keys dotted)."""
    metrics = run.test_metrics() or {}
    top1 = metrics.get("top1")
    by_view = metrics.get("by_view") if isinstance(metrics.get("by_view"), dict) else {}
    views = ", ".join(f"{name} {figures['top1']:.4f}" for name, figures in sorted(by_view.items())
                      if isinstance(figures, dict) and isinstance(figures.get("top1"), float))
    row = {"run": f"{run.model_name}/{run.version}", "status": shown_status(run),
           "top1": f"{top1:.4f}" if isinstance(top1, float) else "-", "views": views or "-"}
    if config is None:
        return {**row, "notes": "(config.yaml damaged)", "config": None}
    notes = str(config.get("run.notes") or "").strip()
    return {**row, "notes": notes.splitlines()[0] if notes else "", "config": config}


def _cell(row: dict, column: str) -> str:
    if column in LIST_COLUMNS:
        return row[column]
    return "?" if row["config"] is None else _cut(_short(row["config"].get(column)), CELL_WIDTH)


def _width(columns: list[str], cells: list[dict]) -> int:
    """The width of a table of these columns, two spaces between them."""
    return sum(max(len(column), *(len(_cell(row, column)) for row in cells)) for column in columns) \
        + 2 * (len(columns) - 1)


def _lines(columns: list[str], cells: list[dict], width: int | None) -> list[str]:
    """The header and one line per run; the notes (last, or wherever --columns puts them) cut to `width`."""
    rows = [columns, *([_cell(row, column) for column in columns] for row in cells)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    if "notes" in columns and width is not None:
        index = columns.index("notes")
        others = sum(w for i, w in enumerate(widths) if i != index) + 2 * (len(columns) - 1)
        widths[index] = max(len("notes"), min(widths[index], width - others))
        rows = [[_cut(cell, widths[index]) if i == index else cell for i, cell in enumerate(row)] for row in rows]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _cut(text: str, width: int | None) -> str:
    """`text` within `width` characters: cut, ending in ... when it was longer."""
    if width is None or len(text) <= width:
        return text
    return text[:max(width - 3, 0)] + "..." if width > 3 else text[:width]


def _short(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# ---------------------------------------------------------------- diff


def unified_diff(a: Run, b: Run) -> str:
    chunks = []
    for name in DIFF_FILES:
        left, right = a.path / name, b.path / name
        if not left.exists() and not right.exists():
            continue
        left_lines = left.read_text(encoding="utf-8").splitlines(keepends=True) if left.exists() else []
        right_lines = right.read_text(encoding="utf-8").splitlines(keepends=True) if right.exists() else []
        chunks.extend(difflib.unified_diff(left_lines, right_lines, str(left), str(right)))
    return "".join(chunks)


def diff(a: Run, b: Run, interactive: bool | None = None) -> str | None:
    """Open $DIFFTOOL (default vimdiff) on each file pair when on a terminal; else return a unified diff."""
    if interactive is None:
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
    tool = os.environ.get("DIFFTOOL", "vimdiff")
    if interactive and shutil.which(tool.split()[0]):
        for name in DIFF_FILES:
            if (a.path / name).exists() and (b.path / name).exists():
                subprocess.run([*tool.split(), str(a.path / name), str(b.path / name)])
        return None
    return unified_diff(a, b)


def main(argv: list[str] | None = None, prog: str = "python -m shared.runs") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Read the run store.")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="a table of runs: status, test top-1, the config keys that differ, notes")
    listing.add_argument("model", nargs="?")
    listing.add_argument("--dir", default="runs", help="the runs root (default: runs)")
    listing.add_argument("--columns", type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
                         help=f"the columns, comma-separated: {', '.join(LIST_COLUMNS)} or config keys "
                              f"(e.g. run,top1,train.lr.base,notes); default: the keys that differ, as many as fit")
    differ = sub.add_parser("diff", help="vimdiff (or $DIFFTOOL) two runs' model source, config and notes")
    differ.add_argument("a")
    differ.add_argument("b")
    logger = sub.add_parser("log-to-mlflow", help="log a run (config, epoch metrics, test figures, files) to MLflow; "
                            "again: updates the same MLflow run (.[mlflow])")
    logger.add_argument("run")
    logger.add_argument("--uri", help="the tracking URI (default: the run's track_uri, else MLFLOW_TRACKING_URI, "
                                      "else sqlite:///<runs root>/mlflow.db)")
    args = parser.parse_args(argv)

    def action():
        if args.command == "list":
            if args.model and not (Path(args.dir) / args.model).is_dir():
                raise UserError(f"no runs of model {args.model!r} in {args.dir}")
            # a terminal's width; piped or redirected, the whole table
            width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
            print(table(all_runs(Path(args.dir), args.model), width, args.columns))
        elif args.command == "log-to-mlflow":
            from shared import mlflow_log  # the optional extra, only for this command

            print(mlflow_log.log_command(open_run(args.run).path, args.uri))
        else:
            text = diff(open_run(args.a), open_run(args.b))
            if text is not None:
                print(text or "no differences in " + ", ".join(DIFF_FILES), end="" if text else "\n")
    return run_cli(action)


if __name__ == "__main__":
    sys.exit(main())
