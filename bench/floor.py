"""The gateway's stack without the gateway: uvicorn + Starlette + one aiohttp call per request.

`python bench/floor.py PORT UPSTREAM_URL`. POST /v1/chat/completions: the JSON body is parsed,
encoded again and posted to UPSTREAM_URL, and the upstream's answer goes back as it came. bench.py measures
its CPU per request beside the gateway's; the difference is what the gateway's own work costs (auth,
routing, scheduling, adapters, stats, logs, error handling).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapters import dumps, loads  # noqa: E402  (the gateway's JSON: orjson when installed)


def make_app(upstream: str) -> Starlette:
    sessions: list[aiohttp.ClientSession] = []

    async def proxy(request: Request) -> Response:
        body = dumps(loads(await request.body()))
        async with sessions[0].post(upstream, data=body, headers={"Content-Type": "application/json"}) as answer:
            return Response(await answer.read(), answer.status, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            sessions.append(session)
            yield

    return Starlette(routes=[Route("/v1/chat/completions", proxy, methods=["POST"])], lifespan=lifespan)


if __name__ == "__main__":
    uvicorn.run(make_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                server_header=False)
