"""Processes of the runner started without paying for `import tensorflow` each time.

A test that starts `python -m shared.runner ...` or `python -c CODE` in a process of its own (to kill it at a
commit point, to race two processes, to run servers) pays about 4 CPU-seconds for importing TensorFlow, Keras
and the package before the process does anything; the suite starts well over a hundred such processes. Here a
server per test process imports them once, without running any TensorFlow op (so no thread pool or runtime
exists yet, and a fork is safe), and forks a child for each command: the child takes the command's working
folder, environment, standard streams and arguments, runs the module or code as `python` would (`__main__`,
`sys.argv`, exit status, atexit handlers, a death by signal on an uncaught KeyboardInterrupt) and is a real
process: the test can signal it, kill it, read its pipes. What differs from a fresh interpreter is only what
happens while the interpreter and those modules load: environment variables read at import time come from
the test process, not the command. Tests about start-up itself (TensorFlow's log at import, the console
command, CPU kernels chosen by environment) start real interpreters with `subprocess`, and so do the small
processes that import no TensorFlow (a lock holder: a tenth of a second), which would otherwise start a server
(seconds) in a test process that needs none, as under `-m "not slow"`.

`Popen(args, ...)` and `run(args, ...)` take `subprocess`'s arguments; a command that is not
`[sys.executable, "-m" | "-c", ...]` goes to `subprocess` unchanged.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PIPE, STDOUT, DEVNULL = subprocess.PIPE, subprocess.STDOUT, subprocess.DEVNULL


# ---------------------------------------------------------------- the server (its own process)


def _preload() -> None:
    """Every module of the package (and so TensorFlow, Keras and the libraries the commands use)."""
    import importlib
    import pkgutil

    import shared  # first: it quiets TensorFlow's start-up log and sets the allocator, as in any process

    for module in pkgutil.walk_packages(shared.__path__, "shared."):
        importlib.import_module(module.name)


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
    (length,) = struct.unpack("!I", data[:4])
    data = data[4:]
    while len(data) < length:
        chunk = connection.recv(length - len(data))
        if not chunk:
            raise EOFError("the test process closed the connection mid-request")
        data += chunk
    return json.loads(data), fds


def _exit_status(error: BaseException | None) -> int:
    """What `python` exits with after the main module ended with `error` (None: it returned)."""
    if error is None:
        return 0
    if isinstance(error, SystemExit):
        if error.code is None:
            return 0
        if isinstance(error.code, int):
            return error.code
        print(error.code, file=sys.stderr)
        return 1
    import traceback

    traceback.print_exception(error)
    return 1


def _child(request: dict, fds: list[int]) -> None:
    """Runs the request's command in this forked process and ends it; never returns."""
    try:
        if request["new_session"]:
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        mode, *rest = request["args"]
        target = rest.pop(0) if mode in ("-m", "-c") else mode
        # the server's own first entries (its `-c` folder, the tests) out; the command's own go in below
        sys.path[:] = [entry for entry in sys.path if entry not in ("", str(REPO / "tests"))]
        for entry in reversed(request["env"].get("PYTHONPATH", "").split(os.pathsep)):
            if entry and entry not in sys.path:
                sys.path.insert(0, entry)
    except BaseException as error:  # a bad working folder or stream: the parent sees status 127 and why
        os.write(2, f"forked: cannot start the command: {error!r}\n".encode())
        os._exit(127)
    if request["env"].get("PYTHONUNBUFFERED"):  # read at start-up by python; the same streams, unbuffered
        import io

        for name, fd in (("stdout", 1), ("stderr", 2)):
            old = getattr(sys, name)
            setattr(sys, name, io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=old.encoding,
                                                errors=old.errors, write_through=True))
    import importlib

    import shared

    importlib.reload(shared)  # what `import shared` sets from the environment (TF's log level), from the command's
    if "numpy" in sys.modules:  # a fresh interpreter seeds NumPy's global generator of its own
        sys.modules["numpy"].random.seed()
    error: BaseException | None = None
    try:
        if mode == "-m":
            import runpy

            sys.argv = [target, *rest]
            sys.path[0:0] = [os.getcwd()]
            sys.modules.pop(target, None)  # run as __main__ only, as python -m does (and without runpy's warning)
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif mode == "-c":
            import types

            sys.argv = ["-c", *rest]
            sys.path[0:0] = [""]
            main = types.ModuleType("__main__")
            main.__builtins__ = __builtins__
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
        else:  # python SCRIPT.py ...
            import runpy

            sys.argv = [target, *rest]
            sys.path[0:0] = [os.path.dirname(os.path.abspath(target))]
            runpy.run_path(target, run_name="__main__")
    except BaseException as raised:  # what the interpreter would do with it is decided below
        error = raised
    if isinstance(error, KeyboardInterrupt):  # python dies of the SIGINT, as the test expects of a real one
        import traceback

        traceback.print_exception(error)
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    status = _exit_status(error)
    try:
        threading._shutdown()  # non-daemon threads are waited for, then atexit runs: as at the end of python
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # a failing flush cannot change the status any more
        pass
    os._exit(status)


def _reap(connection: socket.socket, pid: int) -> None:
    """Tells the test process how child `pid` ended (subprocess's returncode: -N for signal N)."""
    _, status = os.waitpid(pid, 0)
    try:
        connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    finally:
        connection.close()


def serve(path: str) -> None:
    _preload()
    # What the server imported lives as long as it does: out of the collector's sight, so that a child's full
    # collections neither walk those objects nor write to their pages (as CPython's gc.freeze() advises before fork).
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    parent = os.getppid()
    listener.settimeout(5)
    while True:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test process died without killing this server: end with it
                os._exit(0)
            continue
        connection.settimeout(None)
        request, fds = _receive(connection)
        pid = os.fork()
        if pid == 0:
            listener.close()
            connection.close()
            _child(request, fds)
        for fd in fds:
            os.close(fd)
        connection.sendall(f"{pid}\n".encode())
        threading.Thread(target=_reap, args=(connection, pid), daemon=True).start()


# ---------------------------------------------------------------- the test side


# Read while TensorFlow loads (the C++ log's level, which gRPC's log keeps from then on; oneDNN; the allocator):
# a command is forked from a server that loaded with the same values.
IMPORT_TIME = ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "TF_CPU_ALLOCATOR_USE_BFC")


class _Server:
    """This test process's servers, one for each setting of IMPORT_TIME, started at first use and killed when
    the process ends."""

    started: dict[tuple, tuple[subprocess.Popen, str]] = {}
    lock = threading.Lock()

    @classmethod
    def address(cls, env: dict) -> str:
        key = tuple(env.get(name) for name in IMPORT_TIME)
        with cls.lock:
            process, path = cls.started.get(key, (None, ""))
            if process is None or process.poll() is not None:
                folder = tempfile.mkdtemp(prefix="forked-")
                atexit.register(shutil.rmtree, folder, True)
                path = os.path.join(folder, "socket")
                server_env = {name: value for name, value in os.environ.items() if name not in IMPORT_TIME}
                server_env.update({name: value for name, value in zip(IMPORT_TIME, key) if value is not None})
                process = subprocess.Popen(
                    [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); "
                     f"import forked; forked.serve({path!r})"],
                    cwd=REPO, env=server_env, stdin=DEVNULL, stdout=PIPE, text=True)
                atexit.register(process.kill)
                line = process.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"the fork server did not start (it said {line!r}; see stderr above)")
                cls.started[key] = process, path
            return path


def _fd(stream: Any, inherited: int) -> tuple[int, int | None, bool]:
    """(the child's fd `inherited` (0, 1 or 2), our end of a new pipe or None, whether we close the child's fd
    once it has it)."""
    if stream is None:
        return inherited, None, False
    if stream == PIPE:
        read, write = os.pipe()
        return (read, write, True) if inherited == 0 else (write, read, True)
    if stream == DEVNULL:
        return os.open(os.devnull, os.O_RDWR), None, True
    if isinstance(stream, int):
        return stream, None, False
    return stream.fileno(), None, False


class Popen:
    """subprocess.Popen's interface over a child forked by this process's server."""

    def __init__(self, args: list, cwd: str | os.PathLike | None = None, env: dict | None = None,
                 stdin: Any = None, stdout: Any = None, stderr: Any = None, text: bool = False,
                 start_new_session: bool = False, universal_newlines: bool = False) -> None:
        self.args = args
        self.returncode: int | None = None
        text = text or universal_newlines
        stdin_fd, stdin_ours, close_in = _fd(stdin, 0)
        stdout_fd, stdout_ours, close_out = _fd(stdout, 1)
        if stderr == STDOUT:
            stderr_fd, stderr_ours, close_err = stdout_fd, None, False
        else:
            stderr_fd, stderr_ours, close_err = _fd(stderr, 2)
        env = dict(os.environ if env is None else env)
        request = {"args": [str(arg) for arg in args[1:]], "cwd": str(cwd or os.getcwd()), "env": env,
                   "new_session": start_new_session}
        payload = json.dumps(request).encode()
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._connection.connect(_Server.address(env))
            socket.send_fds(self._connection, [struct.pack("!I", len(payload)) + payload[:60000]],
                            [stdin_fd, stdout_fd, stderr_fd])
            if len(payload) > 60000:
                self._connection.sendall(payload[60000:])
            self.pid = int(self._readline(None))
        finally:
            for fd, close in ((stdin_fd, close_in), (stdout_fd, close_out), (stderr_fd, close_err)):
                if close:
                    os.close(fd)
        mode = "w" if text else "wb"
        self.stdin = open(stdin_ours, mode, buffering=1 if text else -1) if stdin_ours is not None else None
        mode = "r" if text else "rb"
        self.stdout = open(stdout_ours, mode) if stdout_ours is not None else None
        self.stderr = open(stderr_ours, mode) if stderr_ours is not None else None

    def _readline(self, timeout: float | None) -> str:
        data = b""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not data.endswith(b"\n"):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._connection], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            chunk = self._connection.recv(64)
            if not chunk:
                raise RuntimeError("the fork server ended before the child")
            data += chunk
        return data.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.wait(0)
            except subprocess.TimeoutExpired:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = int(self._readline(timeout))
            self._connection.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]:
        if self.stdin is not None:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        read: dict[str, Any] = {}
        readers = [threading.Thread(target=lambda name=name, stream=stream: read.__setitem__(name, stream.read()),
                                    daemon=True)
                   for name, stream in (("out", self.stdout), ("err", self.stderr)) if stream is not None]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return read.get("out"), read.get("err")

    def __enter__(self) -> Popen:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (self.stdout, self.stderr, self.stdin):
            if stream is not None:
                stream.close()
        self.wait()


def _forkable(args: list) -> bool:
    return len(args) >= 2 and str(args[0]) == sys.executable and (
        str(args[1]) in ("-m", "-c") and len(args) >= 3 or str(args[1]).endswith(".py"))


def popen(args: list, **kwargs: Any) -> Popen | subprocess.Popen:
    """A forked child for `python -m`/`-c` commands, `subprocess.Popen` for any other."""
    return Popen(args, **kwargs) if _forkable(args) else subprocess.Popen(args, **kwargs)


def run(args: list, *, capture_output: bool = False, timeout: float | None = None, check: bool = False,
        input: Any = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run over `popen`."""
    if not _forkable(args):
        return subprocess.run(args, capture_output=capture_output, timeout=timeout, check=check, input=input,
                              **kwargs)
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = PIPE
    if input is not None:
        kwargs["stdin"] = PIPE
    process = Popen(args, **kwargs)
    try:
        out, err = process.communicate(input, timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    if check and process.returncode:
        raise subprocess.CalledProcessError(process.returncode, args, out, err)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


if __name__ == "__main__":
    serve(sys.argv[1])
