import subprocess
import sys

import dnn2bnn


def _run(*args):
    return subprocess.run([sys.executable, "-m", "dnn2bnn", *args], capture_output=True, text=True, timeout=120)


def test_version_and_help():
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"dnn2bnn {dnn2bnn.__version__}"
    result = _run("--help")
    assert result.returncode == 0 and "usage: dnn2bnn" in result.stdout


def test_unknown_option_is_a_usage_error():
    result = _run("--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr
