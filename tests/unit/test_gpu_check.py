"""benchmarks/gpu_check.sh on a machine without a GPU: it gets as far as the CUDA check and stops there, plainly."""

from __future__ import annotations

import os
import subprocess

from settings import REPO_ROOT


def test_without_a_gpu_the_script_fails_clearly_and_quickly() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_LIMIT_S": "120"}
    script = REPO_ROOT / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "gpu_check: no CUDA device: torch.cuda.is_available() is False" in done.stderr
    assert "--cpu-dry-run" in done.stderr  # what to do instead
