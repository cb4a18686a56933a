"""HTTP probes that never raise (a free port, a status code, a JSON body: None when not reachable), and an ASGI
app served on a local port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
