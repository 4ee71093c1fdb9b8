"""A webhook receiver for tests, served by a real uvicorn: records what arrives, answers as told.

Its behaviour comes from the environment: ``RECEIVER_LOG`` (a JSON-lines file of every request),
``RECEIVER_STATUS`` (the status to answer, default 200), ``RECEIVER_LOCATION`` (for redirects),
``RECEIVER_BODY_BYTES`` (a reply body of that size) and ``RECEIVER_DELAY`` (seconds before
answering).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from fastapi import FastAPI, Request, Response


def create_app() -> FastAPI:
    app = FastAPI()
    log_path = os.environ["RECEIVER_LOG"]
    status = int(os.environ.get("RECEIVER_STATUS", "200"))
    location = os.environ.get("RECEIVER_LOCATION", "")
    body_bytes = int(os.environ.get("RECEIVER_BODY_BYTES", "0"))
    delay = float(os.environ.get("RECEIVER_DELAY", "0"))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        body = await request.body()
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(
                json.dumps(
                    {"headers": dict(request.headers), "body": body.decode(), "at": time.time()}
                )
                + "\n"
            )
        if delay:
            await asyncio.sleep(delay)
        headers = {"location": location} if location else {}
        return Response(b"x" * body_bytes, status_code=status, headers=headers)

    return app
