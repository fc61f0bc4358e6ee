"""TensorFlow's C++ log, quiet unless asked for.

TensorFlow's C++ side logs as it starts: "oneDNN custom operations are on", "Could not find cuda drivers",
and on a machine without a GPU "failed call to cuInit: ... CUDA error", which reads as a fault. Its switch is
the environment variable TF_CPP_MIN_LOG_LEVEL (0 everything, 1 no INFO, 2 no WARNING either, 3 no ERROR
either), which `import shared` sets to 3 unless the environment already sets it: TF_CPP_MIN_LOG_LEVEL=0
brings every line back.

TensorFlow does not apply that level to the lines its libraries write while they load, before its logging
is set up (tensorflow/tensorflow#100442). So the first `import tensorflow` after `import shared` runs with
the process's stderr (the file descriptor, where C++ writes) sent through a small filter process, which passes
every line as it comes but the C++ log lines below the level, in order, even when the import crashes.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import re
import sys
from typing import Iterator

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = "3"
SEVERITIES = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}

# One C++ log line: absl's format (I0000 00:00:1796496000.900435    4764 port.cc:153] ...) or TensorFlow's
# own (2025-09-17 14:44:05.157831: I external/.../cudart_stub.cc:32] ...); absl's notice that it logs to
# stderr until it is set up counts as a warning.
_RECORD = re.compile(rb"^(?:(?P<absl>[IWEF])\d{4} [\d:.]+ +\d+ \S+:\d+\] |"
                     rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<tf>[IWEF]) \S+:\d+\] )")
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def min_level() -> int:
    """The level TF_CPP_MIN_LOG_LEVEL asks for (0, everything, when unset or not a number)."""
    try:
        return int(os.environ.get(LEVEL_VARIABLE, "0"))
    except ValueError:
        return 0


def kept_lines(written: bytes, level: int) -> bytes:
    """`written` without the C++ log lines whose severity is below `level`."""
    kept = []
    for line in written.splitlines(keepends=True):
        record = _RECORD.match(line)
        severity = SEVERITIES[record.group("absl") or record.group("tf")] if record \
            else SEVERITIES[b"W"] if line.rstrip(b"\r\n") == _ABSL_NOTICE else None
        if severity is None or severity >= level:
            kept.append(line)
    return b"".join(kept)


def forward(level: int) -> None:
    """The filter process: standard input to standard output, a line at a time, less the C++ log lines below
    `level` (`filtered_stderr`)."""
    source, target = sys.stdin.buffer, sys.stdout.buffer
    for line in source:
        target.write(kept_lines(line, level))
        target.flush()


@contextlib.contextmanager
def filtered_stderr(level: int) -> Iterator[None]:
    """Inside: file descriptor 2 goes through a filter process (`forward`) to the real stderr, which drops the
    C++ log lines below `level` and passes every other line as it comes. A process of its own: when the inside
    crashes the whole process (TensorFlow aborts on a CPU it was not built for, after a fatal line saying so),
    the filter still reads and passes what was written before."""
    import subprocess

    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to redirect
        yield
        return
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                            os.environ.get("PYTHONPATH")]))}
    try:
        process = subprocess.Popen([sys.executable, "-c", "import sys; from shared.tf_log import forward; "
                                                          "forward(int(sys.argv[1]))", str(level)],
                                   stdin=subprocess.PIPE, stdout=saved, stderr=saved, env=environment)
    except OSError:  # no process to filter with: nothing is filtered
        os.close(saved)
        yield
        return
    os.dup2(process.stdin.fileno(), 2)
    process.stdin.close()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the filter passes what is left and ends
        os.close(saved)
        process.wait()


class _FilteredLoader(importlib.abc.Loader):
    """TensorFlow's own loader, executing the package inside `filtered_stderr`."""

    def __init__(self, loader, finder: QuietTensorFlowImport):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader  # nothing of this wrapper stays behind
        with filtered_stderr(self.finder.level):
            self.loader.exec_module(module)
        with contextlib.suppress(ValueError):  # loaded: nothing more to filter
            sys.meta_path.remove(self.finder)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as the other finders do and has it load inside `filtered_stderr`."""

    def __init__(self, level: int):
        self.level = level

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _FilteredLoader(spec.loader, self)
                return spec
        return None


def quiet_by_default() -> None:
    """TF_CPP_MIN_LOG_LEVEL 3 unless the environment sets it, and that level applied to the lines written while
    TensorFlow loads (when it has not loaded yet)."""
    os.environ.setdefault(LEVEL_VARIABLE, DEFAULT_LEVEL)
    level = min_level()
    if level > 0 and "tensorflow" not in sys.modules \
            and not any(isinstance(finder, QuietTensorFlowImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, QuietTensorFlowImport(level))
