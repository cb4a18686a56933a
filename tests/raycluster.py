"""A `ray start --head` cluster owned by one test: started in the foreground, killed by session.

Unlike `ray stop`, which ends every Ray process on the machine, teardown here ends only the
processes of this cluster's session.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from settings import REPO_ROOT, Settings

RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))


def clean_env() -> dict[str, str]:
    """The environment without any of the service's variables, as a cluster started earlier has."""
    ours = {name.upper() for name in Settings.model_fields} | {"RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S"}
    return {k: v for k, v in os.environ.items() if k.upper() not in ours and not k.startswith("RAY_")}


class RayHead:
    """``with RayHead(port) as head:`` runs `ray start --head --block` until the block ends."""

    def __init__(
        self,
        port: int,
        num_cpus: int = 2,
        extra_args: tuple[str, ...] = (),
        dashboard_port: int | None = None,
        env: Mapping[str, str] | None = None,
        auth_token: str | None = None,
    ) -> None:
        """``dashboard_port``: also run the dashboard there (``serve deploy`` talks to it);
        ``env``: extra variables for the Ray processes (never the service's own settings);
        ``auth_token``: Ray's token for this cluster (a head restarted over the same GCS needs the old one)."""
        self.port = port
        self.dashboard_port = dashboard_port
        if dashboard_port is None:
            dashboard = ["--include-dashboard=false"]
        else:
            from testing.http import free_port

            dashboard = [
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                # the agent's default port (52365) may belong to another cluster on this machine
                f"--dashboard-agent-listen-port={free_port()}",
            ]  # fmt: skip
        self.args = [
            RAY, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
            *dashboard, "--disable-usage-stats", *extra_args,
        ]  # fmt: skip
        # Token auth (Ray's default for new clusters) with a token of this cluster's own, given to
        # the head and to its clients (client_env): nothing depends on a ~/.ray/auth_token.
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token or uuid.uuid4().hex}
        self.env = {**clean_env(), **self.auth, **(env or {})}
        self.address = ""
        self.session = ""
        self._proc: subprocess.Popen | None = None

    @property
    def dashboard_url(self) -> str:
        """Where ``serve deploy``/``serve status`` reach this cluster (needs ``dashboard_port``)."""
        assert self.dashboard_port is not None, "RayHead was started without a dashboard"
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for a CLI that should join this cluster (and no other)."""
        return {**clean_env(), "RAY_ADDRESS": self.address, **self.auth, **extra}

    def __enter__(self) -> RayHead:
        self._proc = subprocess.Popen(
            self.args, env=self.env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        output = []
        deadline = time.monotonic() + 120
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            output.append(line)
            if match := re.search(r"ray start --address='([^']+)'", line):
                self.address = match.group(1)
            if match := re.search(r"(session_\d{4}-[\d_-]+)", line):
                self.session = self.session or match.group(1)
            if (self.address and self.session) or time.monotonic() > deadline:
                break
        if not self.address or not self.session:
            self.__exit__(None, None, None)
            raise RuntimeError("ray start did not come up:\n" + "".join(output))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.session:
            subprocess.run(["pkill", "-KILL", "-f", self.session], capture_output=True)
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=30)
        # `ray start` recorded this cluster as the machine's current one, and a plain `serve run`
        # or `ray.init()` would try to join it after it is gone (`ray stop` removes the record).
        from ray._common.utils import get_ray_address_file

        record = Path(get_ray_address_file(None))
        if self.address and record.is_file() and record.read_text().strip() == self.address:
            record.unlink()


def run_cli(cmd: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a CLI from the repository root; fail the test with its output if it fails."""
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result
