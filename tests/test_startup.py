"""Start-up: `--help` and argument errors of every root script answer without importing torch (which costs
seconds). A behaviour test: the subprocess reports whether torch got imported, never how long it took."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["inference.py", "app.py", "edit_metadata.py", "build_extension.py", "train_extension.py",
           "calibrate.py", "bench.py"]

# Runs the script as `python script.py ARGS` would (argparse exits with SystemExit), then says on its last
# stdout line whether torch was imported.
PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, {root!r})
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print("\\nTORCH-IMPORTED" if "torch" in sys.modules else "\\nNO-TORCH", code)
"""


def run(script: str, *args: str) -> tuple[str, str, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), str(ROOT / script), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    verdict = proc.stdout.strip().splitlines()[-1]
    return verdict, proc.stdout, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_does_not_import_torch(script):
    verdict, out, err = run(script, "--help")
    assert verdict == "NO-TORCH 0", err
    assert "usage:" in out


@pytest.mark.parametrize("script", SCRIPTS)
def test_argument_error_does_not_import_torch(script):
    verdict, _, err = run(script, "--no-such-flag")
    assert verdict == "NO-TORCH 2", err
    assert "unrecognized arguments: --no-such-flag" in err or "error:" in err
    assert "Traceback" not in err
