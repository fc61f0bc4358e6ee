"""tests/forked.py: a command forked from the server ends as the same command in a new interpreter does (status,
output, working folder, environment, standard input, death by signal, atexit and threads at the end)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import forked

COMMANDS = {
    "argv, folder, environment, status": ["-c", "import os, sys; print(os.getcwd(), os.environ['PROBE'], sys.argv, "
                                          "sys.path[:2]); sys.exit(3)", "a b", "c"],
    "the module path of python -m": ["-m", "site"],
    "SystemExit with a message": ["-c", "raise SystemExit('bye')"],
    "an exception": ["-c", "raise ValueError('boom')"],
    "KeyboardInterrupt": ["-c", "raise KeyboardInterrupt"],
    "a signal": ["-c", "import os, signal; print('before', flush=True); os.kill(os.getpid(), signal.SIGTERM)"],
    "atexit and a thread": ["-c", "import atexit, threading, time; atexit.register(print, 'at exit'); "
                            "threading.Thread(target=lambda: (time.sleep(0.3), print('thread'))).start()"],
    "standard input": ["-c", "import sys; print(sys.stdin.read().upper())"],
    "a module, a user's mistake": ["-m", "shared.runner", "--config", "missing.yaml"],
    "a script": ["script.py", "x"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_a_forked_command_ends_as_in_a_new_interpreter(name, tmp_path):
    (tmp_path / "script.py").write_text("import sys\nprint(__name__, sys.argv, sys.path[0])\n")
    command = [sys.executable, *(str(tmp_path / part) if part == "script.py" else part for part in COMMANDS[name])]
    env = {**os.environ, "PROBE": "é ü"}
    fresh, child = (run(command, cwd=tmp_path, env=env, capture_output=True, text=True, input="hi", timeout=120)
                    for run in (subprocess.run, forked.run))
    assert (child.returncode, child.stdout) == (fresh.returncode, fresh.stdout)
    assert child.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]


@pytest.mark.slow
def test_a_forked_child_is_a_process_to_signal_and_wait_for():
    child = forked.popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "up\n" and child.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.2)
    child.send_signal(signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL
    child.stdout.close()
