"""Loopback helpers shared by the tests that start real servers and process groups."""

import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, proc, timeout: float = 120) -> None:
    """Poll /health of a server started as `proc` until it answers 200; fail with its output if it dies."""
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, f"server exited: {proc.stdout.read() if proc.stdout else ''}"
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.2)
