"""The prepared GPU benchmark runs its whole path on CPU in dry mode."""

import json
import math
import os
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_bench_dry_run_measures_the_real_train_step():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench" / "gpu_bench.py"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    ).stdout
    scanned, unrolled = (json.loads(line) for line in out.splitlines()[:2])
    assert (scanned["scan_layers"], unrolled["scan_layers"]) == (True, False)
    for result in (scanned, unrolled):
        assert result["attention"] == "xla" and result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1.5
        assert 0 < result["temp_gib"] < 1  # the tiny step's scratch memory, as XLA plans it
        assert abs(result["loss"] - math.log(512)) < 0.5  # random tokens: loss ~ ln(vocab)
    assert abs(scanned["loss"] - unrolled["loss"]) < 1e-5  # the same model in either layout
