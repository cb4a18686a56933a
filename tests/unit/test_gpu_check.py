"""benchmarks/gpu_check.sh on a machine without a GPU: it gets as far as the CUDA check and stops there, plainly."""

from __future__ import annotations

import json
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


def test_the_dry_run_takes_every_step_on_cpu(tmp_path) -> None:
    """The same steps on CPU with tiny checkpoints: greedy answers equal generate's, both batchings and the split."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "GPU_CHECK_LIMIT_S": "240"}
    script = REPO_ROOT / "benchmarks" / "gpu_check.sh"
    command = ["bash", str(script), "--cpu-dry-run", "--repeats", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=270)
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = tmp_path.glob("gpu-check-*/gpu_check_dry_run.json")
    data = json.loads(results.read_text())
    for model in data["models"].values():
        assert model["greedy_vs_generate"]["equal"] == model["greedy_vs_generate"]["prompts"] == 8
        for rates in model["tokens_per_s"].values():
            assert rates["engine"] > 0 and rates["generate_batch"] > 0, rates  # a failure is recorded as text
    split = data["split"]
    assert split["greedy_vs_generate"]["equal"] == 4
    assert set(split["load"]["placement"]["devices"]) == {"cpu", "disk"}
