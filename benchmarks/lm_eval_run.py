"""lm-evaluation-harness against the service, beside the harness's own in-process run of the same checkpoint.

    python -m benchmarks.lm_eval_run --lm-eval /path/to/venv/bin/lm_eval

lm-eval is a client, never a dependency of the service: install it in a virtual environment of its own
(``python -m venv /work/.cache/lmeval-venv && /work/.cache/lmeval-venv/bin/pip install "lm_eval==0.4.*"``).
This starts a local Ray with Serve on a free port serving the embedded model twice (as the tests do): in
float32, and with ``DTYPE=auto`` (bfloat16 on a CPU that has it). Two tasks are defined from local files in
``benchmarks/lm_eval_tasks`` (no hub download): ``pydoc_mc``, eight multiple-choice questions on docstrings
scored by log-likelihood, and ``pydoc_ppl``, the perplexity of five docstrings (``loglikelihood_rolling``).
The harness's ``local-completions`` model runs them against each served copy (token-id prompts, ``echo``,
``logprobs: 1``, four prompts a request), then its ``hf`` model runs them on the checkpoint in float32 in
its own process. Equal float32 scores mean the service's prompt log-probabilities are the model's own.
Writes benchmarks/results/lm_eval.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS, machine, write_results
from settings import DEFAULT_MODEL_DIR

logger = logging.getLogger("lm_eval_run")
ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = str(DEFAULT_MODEL_DIR)
TASKS = ["pydoc_mc", "pydoc_ppl"]
SERVED = [("pydoc-gpt-mini", "float32"), ("pydoc-gpt-mini-auto", "auto")]  # served name, DTYPE
RUNS = {"service": "The service, float32", "service_auto": "The service, DTYPE=auto", "hf": "hf in process, float32"}
METRICS = {"pydoc_mc": ["acc", "acc_norm"], "pydoc_ppl": ["word_perplexity", "byte_perplexity", "bits_per_byte"]}


def harness(lm_eval: str, model: str, model_args: str, out: Path) -> tuple[list[str], str, dict[str, Any], float]:
    """Run lm-eval once: its command, its printed output, its scores per task and metric, and the seconds."""
    command = [lm_eval, "run", "--model", model, "--model_args", model_args, "--tasks", *TASKS, "--include_path",
               "benchmarks/lm_eval_tasks", "--batch_size", "4", "--output_path", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    begun = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    seconds = time.monotonic() - begun
    if done.returncode != 0:
        raise RuntimeError(f"lm-eval failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    [results] = sorted(out.rglob("results_*.json"))
    scores = json.loads(results.read_text())["results"]
    table = {task: {m: scores[task][f"{m},none"] for m in METRICS[task]} for task in TASKS}
    return command, done.stdout, table, seconds


def serve_embedded_model() -> str:
    """Deploy the service with the embedded model twice (float32, and DTYPE=auto), one replica each; its URL."""
    from ray import serve

    from ray_serve_app import build_graph
    from settings import build_settings
    from testing.polling import wait_for
    from testing.serve import serve_url

    models = [{"name": name, "model_id": MODEL_DIR, "dtype": dtype, "min_replicas": 1} for name, dtype in SERVED]
    serve.run(build_graph(build_settings({"MODELS": json.dumps(models)})), name="llm", route_prefix="/", blocking=False)
    url = serve_url()

    def answers(model: str) -> bool:
        try:
            body = {"model": model, "prompt": "Return the", "max_tokens": 1}
            return httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    for name, _ in SERVED:
        wait_for(lambda name=name: answers(name), timeout=300, what=f"{name} to answer")
    return url


def page(data: dict[str, Any]) -> str:
    runs = data["runs"]
    head = " | ".join(RUNS[name] for name in RUNS)
    rows = [
        f"| {task} | {metric} | " + " | ".join(f"{runs[name]['scores'][task][metric]:.6f}" for name in RUNS) + " |"
        for task in TASKS
        for metric in METRICS[task]
    ]
    sections = []
    for name, title in RUNS.items():
        run = runs[name]
        sections += [f"## {title} ({run['seconds']:.1f} s)", "", "```", " ".join(run["command"]), "```", "", "```",
                     run["table"].strip(), "```", ""]  # fmt: skip
    return "\n".join(
        [
            "# lm-evaluation-harness against the service",
            "",
            "Written by `python -m benchmarks.lm_eval_run` (its docstring says how to install lm-eval "
            f"{data['lm_eval_version']} in a virtual environment of its own: it is never a dependency of the "
            "service). Two tasks defined from local files (`benchmarks/lm_eval_tasks/`): `pydoc_mc`, eight "
            "multiple-choice questions on docstrings scored by log-likelihood, and `pydoc_ppl`, the perplexity of "
            "five docstrings (`loglikelihood_rolling`). The model is the embedded `pydoc-gpt-mini` (4.3M "
            "parameters), so the scores say nothing of a real model; what matters is that the service's numbers are "
            "the model's own.",
            "",
            "The script started a local Ray with Serve (2 CPUs) serving the model twice, one replica each: in "
            "float32 (`pydoc-gpt-mini`) and with `DTYPE=auto` (`pydoc-gpt-mini-auto`, bfloat16 on this CPU). The "
            "harness's `local-completions` model sent token-id prompts, four a request, with `echo: true`, "
            "`logprobs: 1` and `max_tokens: 1`, and read the prompt tokens' log-probabilities; its `hf` model ran "
            "the same checkpoint in float32 in its own process.",
            "",
            "| task | metric | " + head + " |",
            "|---|---|" + "---:|" * len(RUNS),
            *rows,
            "",
            f"The service in float32 against `hf`: largest relative difference {data['max_relative_difference']:.1e} "
            "(the service scores each prompt in its own forward pass; `hf` pads its batches). In bfloat16 the "
            f"perplexities move by up to {data['auto_relative_difference']:.1e}, as a 7-bit mantissa does.",
            "",
            *sections,
            f"Machine: {data['machine']['cpus']} CPUs shared with other work; load average (1, 5, 15 min) before "
            f"{_load(data['load_before'])}, after {_load(data['load_after'])}. The times are wall-clock on a busy "
            "machine; the scores do not depend on it.",
            "",
        ]
    )


def _load(values: Any) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(abs(a[t][m] - b[t][m]) / max(abs(b[t][m]), 1e-12) for t in TASKS for m in METRICS[t])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-eval", required=True, help="the lm_eval executable of its own virtual environment")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from testing.serve import local_serve

    ask = "import importlib.metadata as m; print(m.version('lm_eval'))"
    python = str(Path(args.lm_eval).parent / "python")
    version = subprocess.run([python, "-c", ask], capture_output=True, text=True, check=True).stdout.strip()
    data: dict[str, Any] = {"lm_eval_version": version, "machine": machine(), "load_before": os.getloadavg()}
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with local_serve(num_cpus=2):
            url = serve_embedded_model()
            for run, (model, _) in zip(("service", "service_auto"), SERVED, strict=True):
                model_args = (
                    f"model={model},base_url={url}/v1/completions,tokenizer={MODEL_DIR},"
                    "tokenizer_backend=huggingface,max_length=512,num_concurrent=1,max_retries=1"
                )
                runs[run] = _run(args.lm_eval, "local-completions", model_args, Path(tmp, run))
        runs["hf"] = _run(args.lm_eval, "hf", f"pretrained={MODEL_DIR},dtype=float32", Path(tmp, "hf"))
    data["load_after"] = os.getloadavg()
    data["runs"] = runs
    data["max_relative_difference"] = _difference(runs["service"]["scores"], runs["hf"]["scores"])
    data["auto_relative_difference"] = _difference(runs["service_auto"]["scores"], runs["hf"]["scores"])
    write_results("lm_eval", data)
    (RESULTS / "lm_eval.md").write_text(page(data))
    print(page(data))
    if data["max_relative_difference"] > 1e-4:
        sys.exit("the service's float32 scores differ from the model's own")


def _run(lm_eval: str, model: str, model_args: str, out: Path) -> dict[str, Any]:
    command, output, scores, seconds = harness(lm_eval, model, model_args, out)
    return {"command": command, "table": _table(output), "scores": scores, "seconds": seconds}


def _table(output: str) -> str:
    """The harness's printed summary: its header line and the table under it."""
    lines = output.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if "batch_size" in line and "(" in line)
    return "\n".join(lines[start:])


if __name__ == "__main__":
    main()
