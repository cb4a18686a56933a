"""The test support package's own parts."""

from __future__ import annotations

import socket
from pathlib import Path

from testing.http import RAY_WORKER_PORTS_END, free_port


def test_a_free_port_is_bindable_and_outside_the_ports_others_pick_on_their_own() -> None:
    """Not one the kernel may hand to another socket meanwhile (its ephemeral range), nor one of Ray's workers'."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(20)]
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    if low - RAY_WORKER_PORTS_END > 1000:  # as on Linux by default (32768): the gap between the two is used
        assert all(RAY_WORKER_PORTS_END < port < low for port in ports), ports
    assert len(set(ports)) > 1
