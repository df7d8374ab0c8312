"""The benchmark scripts reject counts below 1 with a usage error that names the flag (before any work)."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script,flag", [("training.py", "--rounds"), ("training.py", "--steps"),
                                         ("compare_torch.py", "--iters"), ("projection.py", "--batch"),
                                         ("sharding.py", "--devices")])
@pytest.mark.parametrize("value,says", [("0", "give 1 or more"), ("two", "is not a whole number")])
def test_counts_below_one_are_usage_errors(script, flag, value, says):
    r = subprocess.run([sys.executable, str(BENCH / script), flag, value], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert flag in r.stderr and says in r.stderr, r.stderr
