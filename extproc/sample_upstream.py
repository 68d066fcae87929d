"""A sample upstream for the demo and the tests: it answers every HTTP request with a
JSON echo of what it received, so a user can see exactly which headers reached the
application after Envoy and extproc. A request header `x-echo-delay-ms: N` delays the
answer by N ms (at most 10 s).

    python -m extproc.sample_upstream --port 8080 [--jwks FILE]

With --jwks it also serves that file at /.well-known/jwks.json, as an identity provider
would, so the demo's RequestAuthentication has a real jwksUri to fetch (the file is read
on every request, so replacing it rotates the keys).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

from aiohttp import web

MAX_DELAY_MS = 10_000


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    delay = request.headers.get("x-echo-delay-ms", "")
    if delay.isdigit():  # a slow application, for latency and span-duration checks
        await asyncio.sleep(min(int(delay), MAX_DELAY_MS) / 1000)
    payload = {
        "method": request.method,
        "path": request.path_qs,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body_bytes": len(body),
    }
    return web.Response(text=json.dumps(payload, sort_keys=True) + "\n", content_type="application/json")


def make_app(jwks_file: str | None = None) -> web.Application:
    app = web.Application()
    if jwks_file:

        async def jwks(_: web.Request) -> web.Response:
            with open(jwks_file, encoding="utf-8") as f:
                return web.Response(text=f.read(), content_type="application/json")

        app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def _main(host: str, port: int, jwks_file: str | None = None) -> None:
    runner = web.AppRunner(make_app(jwks_file), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    print(f"sample upstream listening on {host}:{port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--jwks", metavar="FILE", help="serve FILE at /.well-known/jwks.json")
    args = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.host, args.port, args.jwks))


if __name__ == "__main__":
    main()
