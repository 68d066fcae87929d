"""What an `extproc envoy-config` bootstrap is built for: the mode, the side of the mesh, and
the addresses. Defaults are those of the files in envoy/, which run together on one machine:
the inbound sidecar on :10000/:10001 in front of the application on :8080, the outbound one on
:15001/:15002 in front of the inbound one."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    AUTHZ = "authz+als"  # ext_authz over gRPC and the gRPC access log service
    AUTHZ_HTTP = "authz-http"  # ext_authz's HTTP service for checks, access logs over gRPC
    EXTPROC = "extproc"  # one ext_proc filter for HTTP; TCP as in authz+als


MODE_ALIASES = {"authz": Mode.AUTHZ}  # the name `extproc demo --mode` uses


class Side(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """`host:port`, or `[v6]:port`; a clear ValueError otherwise."""
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        elif ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address as [address]:port")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Options:
    mode: Mode
    side: Side
    listen: Endpoint  # the HTTP listener
    tcp_listen: Endpoint | None  # the TCP listener; None for none
    upstream: Endpoint  # where HTTP goes: the application (inbound) or the server's sidecar
    tcp_upstream: Endpoint  # where TCP goes
    extproc: Endpoint  # extproc's gRPC listener (--listen)
    extproc_http: Endpoint  # extproc's HTTP checks (--http-listen); authz-http only
    admin: Endpoint

    @property
    def inbound(self) -> bool:
        return self.side is Side.INBOUND

    @property
    def shared_upstream(self) -> bool:
        """Inbound HTTP and TCP go to one application cluster when they share an address."""
        return self.inbound and self.tcp_upstream == self.upstream


_INBOUND = {
    "listen": "0.0.0.0:10000",
    "tcp_listen": "0.0.0.0:10001",
    "upstream": "127.0.0.1:8080",
    "tcp_upstream": None,  # the same as upstream
    "extproc": "127.0.0.1:9001",
    "extproc_http": "127.0.0.1:9003",
    "admin": "127.0.0.1:9901",
}
_OUTBOUND = {
    "listen": "127.0.0.1:15001",
    "tcp_listen": "127.0.0.1:15002",
    "upstream": "127.0.0.1:10000",
    "tcp_upstream": "127.0.0.1:10001",
    "extproc": "127.0.0.1:9011",
    "extproc_http": "127.0.0.1:9013",
    "admin": "127.0.0.1:9911",
}
ADDRESS_FIELDS = tuple(_INBOUND)


def defaults(side: Side) -> dict[str, str | None]:
    return dict(_INBOUND if side is Side.INBOUND else _OUTBOUND)


def build_options(mode: str, side: str, *, no_tcp: bool = False, **given: str | None) -> Options:
    """Options from strings (the CLI's), each address defaulted for the side; ValueError names
    the option that is wrong."""
    mode = MODE_ALIASES.get(mode, mode)
    try:
        m, s = Mode(mode), Side(side)
    except ValueError as e:
        raise ValueError(f"--mode/--direction: {e}") from None
    values = defaults(s)
    unknown = set(given) - set(values)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    values.update({k: v for k, v in given.items() if v is not None})
    if values["tcp_upstream"] is None:
        values["tcp_upstream"] = values["upstream"]
    parsed: dict[str, Endpoint | None] = {}
    for name, text in values.items():
        try:
            parsed[name] = Endpoint.parse(str(text))
        except ValueError as e:
            raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
    if no_tcp:
        parsed["tcp_listen"] = None
    return Options(mode=m, side=s, **parsed)  # type: ignore[arg-type]
