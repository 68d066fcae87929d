"""Remote key sets against a real local HTTP server: first fetch, refresh, failures keep the
last good keys, unknown-kid refetches are rate-limited, OpenID discovery."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from extproc.authn.jwks_source import JwksRegistry
from extproc.authn.program import RemoteSource


def jwk(kid: str) -> dict[str, Any]:
    k = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    k["kid"] = kid
    return k


class KeyServer:
    def __init__(self) -> None:
        self.keys = [jwk("k1")]
        self.status = 200
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def jwks(_: web.Request) -> web.Response:
            self.hits += 1
            if self.status != 200:
                return web.Response(status=self.status, text="down")
            return web.json_response({"keys": self.keys})

        async def discovery(_: web.Request) -> web.Response:
            return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/keys"})

        app = web.Application()
        app.add_routes([web.get("/keys", jwks), web.get("/.well-known/openid-configuration", discovery)])
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def run(test: Callable[[KeyServer], Awaitable[None]]) -> None:
    async def main() -> None:
        server = KeyServer()
        await server.start()
        try:
            await test(server)
        finally:
            await server.stop()

    asyncio.run(main())


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def kids(reg: JwksRegistry, src: RemoteSource) -> list[str]:
    st = reg.states[src.key]
    return [k.kid for k in st.keys.keys] if st.keys else []


def test_first_fetch_fills_keys_and_failures_keep_the_last_good_ones() -> None:
    async def body(srv: KeyServer) -> None:
        reg = JwksRegistry(refresh_interval_s=0.05, kid_refresh_interval_s=30)
        src = RemoteSource("https://issuer", f"{srv.url}/keys", timeout_s=1)
        reg.sync([src])
        await until(lambda: kids(reg, src) == ["k1"])
        srv.status = 503
        failures = reg.states[src.key].fetches["failure"]
        await until(lambda: reg.states[src.key].fetches["failure"] > failures)
        assert kids(reg, src) == ["k1"]  # still the last good keys
        assert "HTTP 503" in reg.states[src.key].describe()["lastError"]
        srv.status, srv.keys = 200, [jwk("k2")]
        await until(lambda: kids(reg, src) == ["k2"])
        await reg.close()

    run(body)


def test_unchanged_document_keeps_the_same_key_set_version() -> None:
    async def body(srv: KeyServer) -> None:
        reg = JwksRegistry(refresh_interval_s=0.02)
        src = RemoteSource("https://issuer", f"{srv.url}/keys", timeout_s=1)
        reg.sync([src])
        await until(lambda: reg.states[src.key].keys is not None)
        version = reg.states[src.key].keys.version  # type: ignore[union-attr]
        hits = srv.hits
        await until(lambda: srv.hits >= hits + 3)
        assert reg.states[src.key].keys.version == version  # type: ignore[union-attr]
        await reg.close()

    run(body)


def test_unknown_kid_refetch_is_rate_limited() -> None:
    async def body(srv: KeyServer) -> None:
        reg = JwksRegistry(refresh_interval_s=3600, kid_refresh_interval_s=30)
        src = RemoteSource("https://issuer", f"{srv.url}/keys", timeout_s=1)
        reg.sync([src])
        await until(lambda: kids(reg, src) == ["k1"])
        srv.keys = [jwk("k1"), jwk("k2")]
        assert await reg.refresh([], [src]) is True
        assert kids(reg, src) == ["k1", "k2"]
        hits = srv.hits
        srv.keys = [jwk("k3")]
        assert await reg.refresh([], [src]) is False  # within the interval: no fetch at all
        assert srv.hits == hits
        assert reg.states[src.key].kid_refreshes == 1
        await reg.close()

    run(body)


def test_unreachable_source_has_no_keys_and_requests_do_not_hang() -> None:
    async def body(srv: KeyServer) -> None:
        reg = JwksRegistry(refresh_interval_s=3600, kid_refresh_interval_s=0)
        src = RemoteSource("https://issuer", "http://127.0.0.1:9/keys", timeout_s=0.5)
        reg.sync([src])
        # A hang guard, not a speed check: the wait is bounded by the source's timeout.
        assert await asyncio.wait_for(reg.refresh([src], []), timeout=30) is False
        assert reg.states[src.key].keys is None
        assert reg.states[src.key].fetches["failure"] >= 1
        await reg.close()

    run(body)


def test_issuer_without_jwks_uri_uses_openid_discovery() -> None:
    async def body(srv: KeyServer) -> None:
        reg = JwksRegistry()
        src = RemoteSource(srv.url, "", timeout_s=1)
        reg.sync([src])
        await until(lambda: kids(reg, src) == ["k1"])
        assert reg.states[src.key].jwks_uri == f"{srv.url}/keys"
        await reg.close()

    run(body)


def test_sync_forgets_sources_no_longer_used() -> None:
    async def body(srv: KeyServer) -> None:
        reg = JwksRegistry()
        a = RemoteSource("https://a", f"{srv.url}/keys", timeout_s=1)
        b = RemoteSource("https://b", f"{srv.url}/keys?b", timeout_s=1)
        reg.sync([a, b])
        await until(lambda: bool(kids(reg, a)) and bool(kids(reg, b)))
        reg.sync([b])
        assert set(reg.states) == {b.key}
        await reg.close()

    run(body)
