"""Running the HTTP app: ``serve`` (the ``chatfactory serve`` command, until interrupted) and
``ServerThread`` (a real server on a free port in a background thread, for tests and notebooks)."""

from __future__ import annotations

import socket
import threading
import time

from .api import create_app
from .service import load_service


class ServerThread:
    """A real uvicorn server on 127.0.0.1 and a free port, in a background thread (tests, notebooks).

        with ServerThread(create_app(svc)) as url:  # "http://127.0.0.1:PORT"
            ..."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(run_dir, stage=None, host="127.0.0.1", port=8000, api_key=None, slots=16, device="auto",
          allow_origin=(), quantize: str | None = None, max_memory: int | str | None = None) -> None:
    """``chatfactory serve``: load the run and serve it until interrupted (``allow_origin``: serve/guard.py;
    ``quantize`` / ``max_memory``: how the model loads, as in ``load_model``)."""
    import uvicorn

    svc = load_service(run_dir, stage, api_key, slots, device, quantize, max_memory)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach it can use it")
    where = next(svc.model.parameters()).device
    print(f"serving {svc.name} at http://{host}:{port}/  (API: http://{host}:{port}/v1, {slots} batch slots, "
          f"{where})", flush=True)
    uvicorn.run(create_app(svc, allow_origin), host=host, port=port, log_level="warning")
