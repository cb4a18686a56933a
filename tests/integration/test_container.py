"""The image, as far as this machine can run it without a Docker engine.

The files the Dockerfile copies are staged in a fresh folder (its WORKDIR), then its CMD runs there
with its ENV and a HOME of its own, in a network namespace of its own (a container's private
loopback, so port 8000 is ours). Its HEALTHCHECK command and a /generate run inside that namespace;
its STOPSIGNAL stops it. What this cannot show: the pip layer (this venv stands in for /opt/venv),
the base image, and the non-root USER (this machine's Python lives under /root, which only root may
enter; test_dockerfile.py checks the USER line).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from settings import REPO_ROOT
from testing.polling import wait_for
from tests.dockerfile import Instruction, copy_sources, env_values, exec_form, parse

GENERATE = """
import json, sys, urllib.request
body = json.dumps({"prompt": "Return the", "generation_kwargs": {"max_new_tokens": 8, "temperature": 0}}).encode()
request = urllib.request.Request("http://127.0.0.1:8000/generate", body, {"Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=120).read().decode())
"""


def _namespaces_work() -> str:
    probe = subprocess.run(["unshare", "--net", "--", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    return "" if probe.returncode == 0 else probe.stderr.strip() or f"exit {probe.returncode}"


def _default_signals() -> None:
    """Every signal at its default, as a container's first process starts. A shell's background job
    (``cmd &`` without job control) ignores SIGINT, the ignore is inherited, and a Python started so
    never turns SIGINT into KeyboardInterrupt: `serve run` would not stop on the image's STOPSIGNAL."""
    for number in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)


@pytest.fixture
def root() -> Iterator[Path]:
    """A scratch folder with a short path (Ray's socket paths must stay short)."""
    path = Path(tempfile.mkdtemp(prefix="img-", dir="/tmp"))
    try:
        yield path
    finally:
        subprocess.run(["pkill", "-KILL", "-f", str(path)], capture_output=True)  # our Ray session only
        shutil.rmtree(path, ignore_errors=True)


def _stage(instructions: list[Instruction], app: Path) -> None:
    """Copy what each COPY into the WORKDIR copies; the requirements copy is the pip layer's."""
    for instruction in (i for i in instructions if i.keyword == "COPY"):
        *sources, dest = [w for w in instruction.args.split() if not w.startswith("--")]
        if dest.startswith("/"):
            continue
        for source in copy_sources(instruction):
            target = app / dest / Path(source).name if dest.endswith("/") and len(sources) > 1 else app / dest
            if (REPO_ROOT / source).is_dir():
                shutil.copytree(REPO_ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO_ROOT / source, target)


def test_the_image_command_serves_the_embedded_model(root: Path) -> None:
    if reason := _namespaces_work():
        pytest.skip(f"cannot create a network namespace here (needs root): {reason}")
    instructions = parse((REPO_ROOT / "Dockerfile").read_text())
    workdir = next(i.args for i in instructions if i.keyword == "WORKDIR")
    app, home, ray_tmp = root / workdir.strip("/"), root / "home", root / "t"
    _stage(instructions, app)
    home.mkdir()
    ray_tmp.mkdir()

    image_env = env_values(instructions)
    env = {
        **{k: v for k, v in image_env.items() if "$" not in v and k != "VIRTUAL_ENV"},
        "PYTHONPATH": str(app),  # the image's PYTHONPATH is its WORKDIR
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",  # this venv stands in for /opt/venv
        "HOME": str(home),
        "RAY_TMPDIR": str(ray_tmp),  # a private Ray temp dir, as a container's /tmp is
        "LANG": "C.UTF-8",
    }
    assert image_env["PYTHONPATH"] == workdir
    command = exec_form(next(i.args for i in instructions if i.keyword == "CMD"))
    start = 'ip link set lo up && exec "$@"'
    log = (root / "serve.log").open("w")
    server = subprocess.Popen(
        ["unshare", "--net", "--", "sh", "-c", start, "sh", *command],
        cwd=app, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_default_signals,
    )  # fmt: skip
    inside = ["nsenter", f"--net=/proc/{server.pid}/ns/net", "--"]

    def output() -> str:
        return (root / "serve.log").read_text()[-4000:]

    try:
        healthcheck = next(i.args for i in instructions if i.keyword == "HEALTHCHECK").partition(" CMD ")[2]
        probe = [*inside, *exec_form(healthcheck)]

        def healthy() -> bool:
            assert server.poll() is None, f"the image's CMD exited ({server.returncode}):\n{output()}"
            return subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode == 0

        wait_for(healthy, timeout=180, interval=1, what="the HEALTHCHECK to pass")
        answer = subprocess.run(
            [*inside, "python3", "-c", GENERATE], env=env, capture_output=True, text=True, timeout=180
        )
        assert answer.returncode == 0, answer.stderr + output()
        body = json.loads(answer.stdout)
        assert body["model"] == "pydoc-gpt-mini"  # the embedded model, served under its directory's name
        assert body["completions"][0] and body["usage"]["completion_tokens"] <= 8

        stop = next(i.args for i in instructions if i.keyword == "STOPSIGNAL")
        server.send_signal(getattr(signal, stop))
        try:
            code = server.wait(timeout=90)  # about 8 s here, with or without a busy core
        except subprocess.TimeoutExpired:
            ps = ["ps", "-s", str(server.pid), "-o", "pid,stat,etime,args"]  # the session start_new_session made
            left = subprocess.run(ps, capture_output=True, text=True)
            pytest.fail(f"`serve run` still running 90 s after {stop}; its processes:\n{left.stdout}\n{output()}")
        assert code == 0, output()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
