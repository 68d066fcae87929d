"""`extproc serve` flags and their EXTPROC_* variables."""

from __future__ import annotations

import argparse

import pytest

from extproc.server.settings import SettingsError, add_serve_arguments, serve_settings


def parse(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return serve_settings(p.parse_args(argv), env or {})


def test_defaults() -> None:
    s = parse(["--config-dir", "/c", "--namespace", "ns"])
    assert s.listen.text == "127.0.0.1:9001" and s.admin.text == "127.0.0.1:9902"
    assert (s.root_namespace, s.trust_domain, s.trust_domain_aliases) == ("istio-system", "cluster.local", ())
    assert s.labels == {} and s.xff_num_trusted_hops == 0 and not s.multiple_custom_providers
    assert (s.jwks_refresh_interval_s, s.jwks_kid_refresh_interval_s, s.jwt_cache_size) == (1200.0, 30.0, 10_000)


def test_every_flag_has_a_variable_and_flags_win() -> None:
    env = {
        "EXTPROC_CONFIG_DIR": "/a:/b",
        "EXTPROC_LISTEN": "unix:/run/extproc.sock",
        "EXTPROC_ADMIN": "0.0.0.0:15000",
        "EXTPROC_NAMESPACE": "shop",
        "EXTPROC_LABELS": "app=cart, version=v2",
        "EXTPROC_WORKLOAD": "cart",
        "EXTPROC_ROOT_NAMESPACE": "root",
        "EXTPROC_TRUST_DOMAIN": "td",
        "EXTPROC_TRUST_DOMAIN_ALIAS": "old,older",
        "EXTPROC_JWT_PAYLOAD_KEY": "claims",
        "EXTPROC_XFF_NUM_TRUSTED_HOPS": "2",
        "EXTPROC_MAX_REQUEST_HEADERS_KB": "128",
        "EXTPROC_MULTIPLE_CUSTOM_PROVIDERS": "true",
        "EXTPROC_DRAIN_TIMEOUT": "3.5",
        "EXTPROC_JWKS_REFRESH_INTERVAL": "5m",
        "EXTPROC_JWKS_KID_REFRESH_INTERVAL": "0s",
        "EXTPROC_JWT_CACHE_SIZE": "0",
        "EXTPROC_LOG_LEVEL": "DEBUG",
        "EXTPROC_LOG_FORMAT": "json",
    }
    s = parse([], env)
    assert s.config_dirs == ("/a", "/b") and s.listen.is_unix and s.admin.host_port() == ("0.0.0.0", 15000)
    assert (s.namespace, s.workload, s.root_namespace, s.trust_domain) == ("shop", "cart", "root", "td")
    assert s.labels == {"app": "cart", "version": "v2"} and s.trust_domain_aliases == ("old", "older")
    assert (s.jwt_payload_key, s.xff_num_trusted_hops, s.max_request_headers_kb) == ("claims", 2, 128)
    assert s.multiple_custom_providers and s.drain_timeout_s == 3.5 and (s.log_level, s.log_format) == ("debug", "json")
    assert (s.jwks_refresh_interval_s, s.jwks_kid_refresh_interval_s, s.jwt_cache_size) == (300.0, 0.0, 0)
    s = parse(["--namespace", "other", "--config-dir", "/x", "--trust-domain-alias", "a", "--labels", "k=v"], env)
    assert (s.namespace, s.config_dirs, s.trust_domain_aliases, s.labels) == ("other", ("/x",), ("a",), {"k": "v"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--namespace", "ns"], "--config-dir is required"),
        (["--config-dir", "/c"], "--namespace is required"),
        (["--config-dir", "/c", "--namespace", "ns", "--listen", "9001"], "expected HOST:PORT or unix:PATH"),
        (["--config-dir", "/c", "--namespace", "ns", "--admin", "unix:/x"], "unix sockets are not supported"),
        (["--config-dir", "/c", "--namespace", "ns", "--labels", "novalue"], "expected k=v"),
        (["--config-dir", "/c", "--namespace", "ns", "--log-level", "loud"], "--log-level"),
        (["--config-dir", "/c", "--namespace", "ns", "--jwks-refresh-interval", "0s"], "must be positive"),
        (["--config-dir", "/c", "--namespace", "ns", "--jwks-refresh-interval", "often"], "invalid duration"),
        (["--config-dir", "/c", "--namespace", "ns", "--jwt-cache-size", "-1"], "at least 0"),
    ],
)
def test_bad_settings(argv: list[str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        parse(argv)


def test_config_settle_and_max_concurrent_rpcs() -> None:
    s = parse(["--config-dir", "/c", "--namespace", "ns"])
    assert (s.config_settle_s, s.max_concurrent_rpcs) == (1.0, 0)
    s = parse(
        ["--config-dir", "/c", "--namespace", "ns"],
        {"EXTPROC_CONFIG_SETTLE": "0s", "EXTPROC_MAX_CONCURRENT_RPCS": "64"},
    )
    assert (s.config_settle_s, s.max_concurrent_rpcs) == (0.0, 64)
    s = parse(["--config-dir", "/c", "--namespace", "ns", "--config-settle", "250ms", "--max-concurrent-rpcs", "8"])
    assert (s.config_settle_s, s.max_concurrent_rpcs) == (0.25, 8)


def test_http_listen_is_off_by_default_and_refused_with_central() -> None:
    assert parse(["--config-dir", "/c", "--namespace", "ns"]).http_listen is None
    s = parse(["--config-dir", "/c", "--namespace", "ns", "--http-listen", "unix:/run/checks.sock"])
    assert s.http_listen is not None and s.http_listen.text == "unix:/run/checks.sock"
    env = {"EXTPROC_HTTP_LISTEN": "127.0.0.1:9003"}
    assert parse(["--config-dir", "/c", "--namespace", "ns"], env).http_listen.text == "127.0.0.1:9003"
    with pytest.raises(SettingsError, match="--http-listen cannot be combined with --central"):
        parse(["--config-dir", "/c", "--central", "--http-listen", "127.0.0.1:9003"])
    with pytest.raises(SettingsError, match="--http-listen"):
        parse(["--config-dir", "/c", "--namespace", "ns", "--http-listen", "nowhere"])
