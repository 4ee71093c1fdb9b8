"""A minimal ASGI app used only by the smoke test of :mod:`tests.servers.uvicorn`.

It answers ``/healthz`` and echoes one environment variable, so the test can see that the
server really runs in a separate process with the environment it was given.
"""

from __future__ import annotations

import os

from fastapi import FastAPI


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/env/{name}")
    def env(name: str) -> dict[str, str | int | None]:
        return {"value": os.environ.get(name), "pid": os.getpid()}

    return app
