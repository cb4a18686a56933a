"""HTTP probes that never raise (a free port, a status code, a JSON body: None when not reachable), and an ASGI
app served on a local port."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

RAY_WORKER_PORTS_END = 19999  # Ray's default max_worker_port: its workers take ports from 10002 up to here


def free_port() -> int:
    """A TCP port free on every local address right now, chosen where nothing else picks ports on its own.

    A port the kernel hands out (to a server bound to port 0, as Ray's processes are, or to an outgoing
    connection) can be taken again between this call and the moment its user binds it, which on a loaded
    machine was a minute later: a `ray start` then failed with "address already in use". So the port comes
    from between Ray's worker ports and the kernel's ephemeral range (``ip_local_port_range``), where only
    explicit choices land; where that gap is too small, from the kernel.
    """
    low = _ephemeral_low()
    choose = random.SystemRandom()
    for _ in range(100 if low - RAY_WORKER_PORTS_END > 1000 else 0):
        port = choose.randrange(RAY_WORKER_PORTS_END + 1, low)
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # unknown: let the kernel choose


def status(url: str, timeout: float = 5, client: httpx.Client | None = None) -> int | None:
    """The status code of a GET of ``url``; None when it does not answer."""
    try:
        return (client or httpx).get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return None


def ok(url: str, timeout: float = 5, client: httpx.Client | None = None) -> bool:
    """Whether a GET of ``url`` answers 200."""
    return status(url, timeout, client) == 200


def get_json(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> Any | None:
    """The JSON body of a 200 answer from ``url``; None when it is not reachable or not 200."""
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def post_ok(url: str, body: dict[str, Any], timeout: float = 300) -> bool:
    """Whether a POST of ``body`` (JSON) to ``url`` answers 200."""
    try:
        return httpx.post(url, json=body, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def serve_asgi(app: Any, port: int | None = None) -> Iterator[str]:
    """Run the ASGI ``app`` with uvicorn on 127.0.0.1 (a free port by default) in a thread; yields its URL."""
    import threading

    import uvicorn

    from testing.polling import wait_for

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name=f"asgi-{port}", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), timeout=20, interval=0.05, what=f"uvicorn on {port}")
    assert server.started, f"the app did not start on port {port}"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
