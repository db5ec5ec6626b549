"""The benchmark scripts still run against the code they measure (they are not part of the package, so nothing else
imports them): each at its smallest size, one thread, checking that it prints its table. No timing is asserted."""

import subprocess
import sys

import pytest
from helpers import REPOSITORY

SMALLEST = {   # script: (arguments, a row its table must print)
    "decode_profile.py": (["--quant", "int8", "--layers", "1", "--context", "8", "--steps", "1", "--repeats",
                           "1", "--threads", "1"], "| rotary |"),
    "kv_cache.py": (["--layers", "1", "--contexts", "8", "--steps", "1", "--rounds", "1", "--threads", "1"], "| 8 |"),
    "kernels.py": (["--rows", "1", "--repeats", "1", "--threads", "1", "--skip", "int8 whole", "int4 block"], "| 1 |"),
    "one_row.py": (["--layers", "1", "--repeats", "1", "--rounds", "1", "--threads", "1"], "int4 weight-only kernel"),
}


@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_a_benchmark_runs_at_its_smallest_size(script):
    args, row = SMALLEST[script]
    run = subprocess.run([sys.executable, str(REPOSITORY / "benchmarks" / script), *args], capture_output=True,
                         text=True, cwd=REPOSITORY, timeout=240, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert row in run.stdout, run.stdout[-2000:]
