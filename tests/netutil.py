"""Loopback helpers shared by the tests that start real servers and process groups."""

import socket
import threading
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


class AppServer:
    """An ASGI app served by uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
