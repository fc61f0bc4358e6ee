"""TensorFlow's C++ log is quiet after `import shared` (shared.tf_log): no start-up lines, no "failed call to
cuInit" on a CPU machine, unless TF_CPP_MIN_LOG_LEVEL asks for them; every other line written meanwhile passes."""

import os
import re
import subprocess
import sys

import pytest

from shared import tf_log

from conftest import REPO

RECORDS = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
           b"I0000 00:00:1796496000.900435    4764 port.cc:153] oneDNN custom operations are on.\n"
           b"W0000 00:00:1796496000.900982    4764 some.cc:31] a warning\n"
           b"2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] Could not find cuda\n"
           b"E0000 00:00:1796496001.328687    4969 cuda_platform.cc:52] failed call to cuInit: CUDA error\n"
           b"F0000 00:00:1796496001.328687    4969 main.cc:1] a fatal error\n")
CPP_LINE = re.compile(r"^([IWEF]\d{4} |\d{4}-\d\d-\d\d .*: [IWEF] |WARNING: All log messages before absl)", re.M)


def test_the_c_log_lines_below_the_level_go_and_every_other_line_stays():
    text = b"a Python warning\n" + RECORDS + b"the last line, unterminated"
    assert tf_log.kept_lines(text, 3) == b"a Python warning\nF0000 00:00:1796496001.328687    4969 main.cc:1] " \
                                         b"a fatal error\nthe last line, unterminated"
    assert tf_log.kept_lines(text, 2).count(b"\n") == 3  # the ERROR (cuInit) stays at level 2
    assert tf_log.kept_lines(text, 1) == text.replace(RECORDS.splitlines(keepends=True)[1], b"").replace(
        RECORDS.splitlines(keepends=True)[3], b"")
    assert tf_log.kept_lines(text, 0) == text


def test_what_is_written_to_the_file_descriptor_while_filtered_passes_on_without_the_log(capfd):
    with pytest.raises(RuntimeError, match="import failed"):
        with tf_log.filtered_stderr(3):
            os.write(2, RECORDS[:200])  # as C++ writes: a line may come in pieces
            os.write(2, RECORDS[200:])
            os.write(2, b"a line of another kind\n")
            raise RuntimeError("import failed")
    assert capfd.readouterr().err == "F0000 00:00:1796496001.328687    4969 main.cc:1] a fatal error\n" \
                                     "a line of another kind\n"


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != tf_log.LEVEL_VARIABLE}  # conftest's
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**environment, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_tensorflow_starts_without_a_line_on_stderr_unless_asked():
    code = ("import shared, warnings, tensorflow as tf\n"
            "print(float(tf.reduce_sum(tf.ones(3))), tf.config.list_physical_devices('GPU'))\n"
            "warnings.warn('a Python warning still shows')\n")
    quiet = run_python(code)
    assert quiet.stdout.startswith("3.0")
    assert "cuInit" not in quiet.stderr and "CUDA" not in quiet.stderr and not CPP_LINE.search(quiet.stderr)
    assert "UserWarning: a Python warning still shows" in quiet.stderr
    loud = run_python(code, TF_CPP_MIN_LOG_LEVEL="0")  # the variable brings TensorFlow's start-up lines back
    assert CPP_LINE.search(loud.stderr), loud.stderr


def test_a_crash_while_filtered_still_shows_what_was_written_before_it():
    """TensorFlow aborts the process on a CPU it was not built for, after a fatal line saying so: the line (and
    any other) still reaches stderr, as the filter is a process of its own."""
    code = ("import os\nfrom shared import tf_log\nwith tf_log.filtered_stderr(3):\n"
            "    os.write(2, b'I0000 00:00:1796496000.900435    4764 port.cc:153] an info line\\n')\n"
            "    os.write(2, b'F0000 00:00:1796496001.328687    4969 cpu_feature_guard.cc:1] built for AVX\\n')\n"
            "    os.abort()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"built for AVX" in result.stderr and b"an info line" not in result.stderr
