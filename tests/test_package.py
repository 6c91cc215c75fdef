"""Packaging promises: the public API imports no torch, and `python -m rnnlab` is the CLI."""
import subprocess
import sys


def test_public_api_does_not_import_torch():
    code = "import sys, rnnlab; from rnnlab import cli, train, decoding, lm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "rnnlab", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("rnnlab ")
