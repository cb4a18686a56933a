"""A Debian ``redis-server`` owned by one test: the external store of a fault-tolerant Ray GCS.

Started on a free port with a password and no persistence to disk (the Ray head restarts in these
tests, Redis does not); stopped by its own process id, nothing else.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """``with RedisServer(port, workdir) as redis:`` serves ``redis.address`` until the block ends."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.password = uuid.uuid4().hex
        self.args = [
            REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", self.password,
            "--save", "", "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no",
        ]  # fmt: skip
        self._proc: subprocess.Popen | None = None
        self._log = workdir / "redis.log"

    def __enter__(self) -> RedisServer:
        with self._log.open("w") as log:
            self._proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.ping():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"redis-server did not come up:\n{self._log.read_text()}")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        """True once the server answers an authenticated PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                reply = b""
                while b"PONG" not in reply and len(reply) < 256:
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    reply += chunk
                return b"+PONG" in reply
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
