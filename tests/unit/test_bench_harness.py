"""The benchmark harness's pure parts: scenario and request mix, Envoy configs, the empty ext_proc
server, delay model, load scripts, status checks, the memory step's entries and counts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from bench import __main__ as cli
from bench.harness import load, memory, noop_extproc, runner, topology
from bench.harness import scenario as sc
from extproc.snapshot import loader
from extproc.telemetry import peer
from tests.fixtures.envoy_config import validate


def test_fault_delays_keep_the_mean_in_whole_milliseconds() -> None:
    assert topology.fault_delays(0) == []
    assert topology.fault_delays(0.5) == [(1, 50.0)]
    assert topology.fault_delays(1) == [(1, 100.0)]
    assert topology.fault_delays(2.25) == [(2, 100.0), (1, 25.0)]
    for rtt in (0.1, 0.5, 0.75, 1.3, 3.0):
        assert sum(ms * pct / 100 for ms, pct in topology.fault_delays(rtt)) == pytest.approx(rtt)
    with pytest.raises(ValueError):
        topology.fault_delays(-1)


@pytest.mark.parametrize("n", [1, 3, 20, 40])
def test_scenario_has_n_policies_that_extproc_loads(n: int, tmp_path: Path) -> None:
    s = sc.build(n)
    assert len(s.authorization_policies()) == n
    assert len(s.request_authentications()) == 1
    s.write(tmp_path)
    loaded = loader.load([str(tmp_path)])
    assert len(loaded.policies) == n
    # The ALLOW that admits the load is always there, and is evaluated last (names sort last).
    names = sorted(d["metadata"]["name"] for d in s.authorization_policies())
    assert names[-1] == "zz-allow-product-readers"
    assert {p.name for p in s.probes} >= {"allowed", "no token", "bad signature", "no ALLOW matches"}


def test_scenario_needs_the_admitting_policy() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        sc.build(0)


def _claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def test_load_mix_is_fifty_tokens_with_exactly_one_request_in_ten_denied() -> None:
    s = sc.build(20)
    assert len(s.tokens) == 50
    subjects = [_claims(t)["sub"] for t in s.tokens]
    assert subjects == list(sc.SUBJECTS) and len(set(subjects)) == 50
    assert len(s.load) == 100
    assert {r.token for r in s.load} == set(range(50))  # every token is sent
    assert s.denied_share == 0.1
    assert [r.expect for r in s.load].count(403) == 10
    assert {r.expect for r in s.load} == {200, 403}  # every token is valid: no 401 in the load
    kinds = {kind: [r for r in s.load if r.kind == kind] for kind in (sc.ALLOWED, sc.BLOCKED_USER, sc.NO_ALLOW)}
    assert {k: len(v) for k, v in kinds.items()} == {sc.ALLOWED: 90, sc.BLOCKED_USER: 5, sc.NO_ALLOW: 5}
    # Allowed: the 45 shoppers, twice each, on product pages.
    assert sorted(subjects[r.token] for r in kinds[sc.ALLOWED]) == sorted(sc.SHOPPERS * 2)
    assert all(r.path.startswith("/api/v1/products/") and r.expect == 200 for r in kinds[sc.ALLOWED])
    # Denied by the DENY on `sub`: each blocked user once, on a product page the ALLOW would admit.
    deny = next(d for d in s.authorization_policies() if d["metadata"]["name"] == "deny-blocked-users")
    blocked = set(deny["spec"]["rules"][0]["when"][0]["values"])
    assert sorted(subjects[r.token] for r in kinds[sc.BLOCKED_USER]) == sorted(blocked)
    assert all(r.path.startswith("/api/v1/products/") for r in kinds[sc.BLOCKED_USER])
    # Denied because no ALLOW matches: shoppers asking for order paths.
    assert all(r.path.startswith(sc.UNMATCHED_PREFIX) and r.token < 45 for r in kinds[sc.NO_ALLOW])


def test_load_mix_spreads_its_denials_so_every_stretch_holds_its_share() -> None:
    """Any ten consecutive entries, round the end too, hold exactly one denial: partial cycles stay close."""
    load_list = sc.build(20).load
    for start in range(len(load_list)):
        window = [load_list[(start + i) % len(load_list)] for i in range(10)]
        assert sum(r.expect == 403 for r in window) == 1, start


def test_admitting_allow_takes_every_principal_of_the_issuer_with_the_scope() -> None:
    allow = next(
        d for d in sc.build(20).authorization_policies() if d["metadata"]["name"] == "zz-allow-product-readers"
    )
    rule = allow["spec"]["rules"][0]
    assert rule["from"] == [{"source": {"requestPrincipals": [f"{sc.ISSUER}/*"]}}]
    assert rule["when"] == [{"key": "request.auth.claims[scope]", "values": ["products.read"]}]
    assert all("products.read" in _claims(t)["scope"].split() for t in sc.build(1).tokens)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_without_the_deny_on_sub_the_blocked_tokens_ask_for_paths_no_allow_matches(n: int) -> None:
    s = sc.build(n)
    assert "deny-blocked-users" not in {d["metadata"]["name"] for d in s.authorization_policies()}
    assert s.denied_share == 0.1 and {r.token for r in s.load} == set(range(50))
    assert {r.kind for r in s.load if r.expect == 403} == {sc.NO_ALLOW}
    assert all(r.path.startswith(sc.UNMATCHED_PREFIX) for r in s.load if r.token >= 45)
    assert "blocked user" not in {p.name for p in s.probes}


def test_http2_list_has_one_token_and_the_same_share_of_unmatched_paths() -> None:
    s = sc.build(20)
    assert s.load_requests("http1") is s.load and s.load_requests("http2") is s.load_h2
    assert {r.token for r in s.load_h2} == {0}
    assert sc.denied_share(s.load_h2) == s.denied_share
    assert all(r.path.startswith(sc.UNMATCHED_PREFIX) for r in s.load_h2 if r.expect == 403)
    mix = s.mix()
    assert mix["tokens"] == 50 and mix["http2"]["tokens"] == 1
    assert mix["kinds"] == {sc.ALLOWED: 90, sc.BLOCKED_USER: 5, sc.NO_ALLOW: 5}


def _validate(cfg: dict, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    code, out = validate(path)
    assert code == 0, out


PORTS = {"admin_port": 19000, "listen_port": 19001, "upstream_port": 19002}


def test_every_mode_config_is_valid_envoy(tmp_path: Path) -> None:
    s = sc.build(20)
    _validate(topology.none_sidecar(**PORTS), tmp_path, "none")
    _validate(topology.native_sidecar(s, **PORTS), tmp_path, "native")
    _validate(topology.noop_sidecar(ext_port=19003, **PORTS), tmp_path, "noop")
    _validate(topology.noop_extproc_sidecar(ext_port=19003, **PORTS), tmp_path, "noop-extproc")
    _validate(topology.extproc_sidecar("authz+als", ext_port=19003, **PORTS), tmp_path, "authz")
    _validate(topology.extproc_sidecar("extproc", ext_port=19003, **PORTS), tmp_path, "extproc")
    _validate(topology.noop_http_sidecar(ext_port=19003, als_port=19009, **PORTS), tmp_path, "noop-http")
    _validate(topology.extproc_sidecar("authz-http", ext_port=19003, http_port=19008, **PORTS), tmp_path, "authz-http")
    opts = topology.MixerOptions(rtt_ms=1.5, sidecars=2, check_cache_hit_percent=80)
    _validate(topology.mixer_sidecar(0, opts, hop_port=19004, **PORTS), tmp_path, "mixer")
    _validate(topology.hop(1.5, admin_port=19005, listen_port=19004, central_port=19006), tmp_path, "hop")
    _validate(topology.upstream(1024, admin_port=19007, listen_port=19002), tmp_path, "upstream")


def _hcm(cfg: dict) -> dict:
    return topology._hcm(topology._listener(cfg, "http"))


def test_baselines_keep_the_shipped_connection_manager_without_extensions() -> None:
    none = _hcm(topology.none_sidecar(**PORTS))
    assert [f["name"] for f in none["http_filters"]] == ["envoy.filters.http.router"]
    assert "access_log" not in none
    native = _hcm(topology.native_sidecar(sc.build(20), **PORTS))
    names = [f["name"] for f in native["http_filters"]]
    assert names[0] == "envoy.filters.http.jwt_authn" and names[-1] == "envoy.filters.http.router"
    assert "envoy.filters.http.rbac" in names
    authz = _hcm(topology.extproc_sidecar("authz+als", ext_port=1, **PORTS))
    assert [a["name"] for a in authz["access_log"]] == ["envoy.access_loggers.http_grpc"]  # stdout log removed
    noop = topology.noop_sidecar(ext_port=1, **PORTS)
    assert [f["name"] for f in _hcm(noop)["http_filters"]] == [topology.EXT_AUTHZ, "envoy.filters.http.router"]


def test_noop_extproc_sidecar_is_the_shipped_ext_proc_filter_without_access_log() -> None:
    noop = topology.noop_extproc_sidecar(ext_port=19003, **PORTS)
    shipped = topology.extproc_sidecar("extproc", ext_port=19003, **PORTS)
    filters = _hcm(noop)["http_filters"]
    assert [f["name"] for f in filters] == [topology.SET_FILTER_STATE, topology.EXT_PROC, "envoy.filters.http.router"]
    # The same filters as the `extproc` mode, settings and all: processing_mode, request_attributes
    # (one of them fed by set_filter_state), timeouts, failure mode.
    assert filters == _hcm(shipped)["http_filters"]
    ext_proc = filters[1]["typed_config"]
    assert ext_proc["processing_mode"]["response_header_mode"] == "SEND"
    assert 'filter_state["extproc.peer_address"]' in ext_proc["request_attributes"]
    assert "access_log" not in _hcm(noop)
    endpoint = topology._cluster(noop, "extproc")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == 19003
    assert [ln["name"] for ln in noop["static_resources"]["listeners"]] == ["http"]


def test_noop_http_sidecar_is_the_whole_authz_http_sidecar_in_front_of_the_empty_server() -> None:
    noop = topology.noop_http_sidecar(ext_port=19003, als_port=19009, **PORTS)
    shipped = topology.extproc_sidecar("authz-http", ext_port=19009, http_port=19003, **PORTS)
    assert noop == shipped  # the same Envoy work: checks, query-token filter, grpc_stats, access log
    names = [f["name"] for f in _hcm(noop)["http_filters"]]
    assert names[:2] == [topology.EXT_AUTHZ, topology.STRIP_QUERY_TOKEN] and names[-1] == "envoy.filters.http.router"
    assert [a["name"] for a in _hcm(noop)["access_log"]] == ["envoy.access_loggers.http_grpc"]
    for cluster, port in (("extproc_http", 19003), ("extproc", 19009)):
        endpoint = topology._cluster(noop, cluster)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == port


def test_noop_http_server_allows_every_check() -> None:
    from bench.harness import noop_http_authz

    answer = noop_http_authz.allow("DELETE", "/x", {}, {}, b"", "", 0)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"content-length: 0\r\n\r\n")


def test_mixer_sidecar_names_its_workload_and_reports_per_request() -> None:
    cfg = topology.mixer_sidecar(1, topology.MixerOptions(), hop_port=19004, **PORTS)
    hcm = _hcm(cfg)
    per_route = hcm["route_config"]["virtual_hosts"][0]["typed_per_filter_config"][topology.EXT_AUTHZ]
    ext = per_route["check_settings"]["context_extensions"]
    assert ext["destination.namespace"] == sc.NAMESPACE
    assert ext["destination.labels"] == "app=productpage,version=v1"
    assert cfg["node"]["metadata"]["LABELS"] == sc.LABELS
    als = hcm["access_log"][0]["typed_config"]["common_config"]
    assert als["buffer_size_bytes"] == 0
    ext_authz = next(f for f in hcm["http_filters"] if f["name"] == topology.EXT_AUTHZ)
    assert "filter_enabled" not in ext_authz["typed_config"]
    endpoint = topology._cluster(cfg, "extproc")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == 19004

    batched = _hcm(topology.mixer_sidecar(0, topology.MixerOptions(report_batching=True), hop_port=1, **PORTS))
    assert "buffer_size_bytes" not in batched["access_log"][0]["typed_config"]["common_config"]
    cached = topology.mixer_sidecar(0, topology.MixerOptions(check_cache_hit_percent=80), hop_port=1, **PORTS)
    ext_authz = next(f for f in _hcm(cached)["http_filters"] if f["name"] == topology.EXT_AUTHZ)
    assert ext_authz["typed_config"]["filter_enabled"]["runtime_key"] == topology.CHECK_CACHE_RUNTIME_KEY
    assert {"name": "admin", "admin_layer": {}} in cached["layered_runtime"]["layers"]


def test_hop_injects_the_configured_delay() -> None:
    cfg = topology.hop(2.5, admin_port=1, listen_port=2, central_port=3)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    faults = [f["typed_config"]["delay"] for f in hcm["http_filters"] if "fault" in f["name"]]
    assert faults == [
        {"fixed_delay": "0.002s", "percentage": {"numerator": 100, "denominator": "HUNDRED"}},
        {"fixed_delay": "0.001s", "percentage": {"numerator": 500000, "denominator": "MILLION"}},
    ]
    assert not [
        f
        for f in topology.hop(0, admin_port=1, listen_port=2, central_port=3)["static_resources"]["listeners"][0][
            "filter_chains"
        ][0]["filters"][0]["typed_config"]["http_filters"]
        if "fault" in f["name"]
    ]


def test_wrk_script_paces_only_with_a_rate() -> None:
    requests = [load.Request("/a", {"authorization": "Bearer t"}), load.Request("/b", {"authorization": "Bearer t"})]
    spec = load.LoadSpec([10000, 10001], 16, 5, 1000, requests, threads=2)
    script = load.wrk_script(spec)
    assert "function delay()" in script
    assert "local interval_ms = 2.000000" in script  # 2 threads share 1000 req/s: a slot every 2 ms each
    assert "local ports = {10000, 10001}" in script
    assert '["authorization"] = "Bearer t"' in script
    closed = load.wrk_script(load.LoadSpec([10000], 16, 5, None, [load.Request("/a")], threads=1))
    assert "function delay()" not in closed


def test_wrk_script_formats_each_entry_once_with_its_own_path_and_token() -> None:
    s = sc.build(20)
    requests = [load.Request(r.path, s.headers(r)) for r in s.load]
    script = load.wrk_script(load.LoadSpec([10000], 16, 5, None, requests))
    # Each of the 50 tokens appears once, in the header sets; the plan names a set per entry.
    for token in s.tokens:
        assert script.count(token) == 1
    plan = script[script.index("local plan = {") : script.index("local formatted")]
    first_use = list(dict.fromkeys(r.token for r in s.load))  # header sets are numbered so, from 1
    entries = [f'{{"{r.path}", {first_use.index(r.token) + 1}}}' for r in s.load]
    assert plan == "local plan = {" + ", ".join(entries) + "}\n"
    set_lines = script[script.index("local header_sets = {") : script.index("local plan")].splitlines()
    assert len(set_lines) == 50
    for line, token in zip(set_lines, first_use, strict=True):
        assert f'{{["authorization"] = "Bearer {s.tokens[token]}"}}' in line
    assert "function init(args)" in script
    assert 'formatted[i] = wrk.format("GET", entry[1], h)' in script
    assert "return formatted[(n + offset) % #formatted + 1]" in script
    with pytest.raises(ValueError, match="empty"):
        load.wrk_script(load.LoadSpec([10000], 16, 5, None, []))


def test_h2load_needs_one_set_of_headers() -> None:
    s = sc.build(20)
    one = [load.Request(r.path, s.headers(r)) for r in s.load_h2]
    assert load.uniform_headers(one) == {"authorization": f"Bearer {s.token}"}
    per_request = [load.Request(r.path, s.headers(r)) for r in s.load]
    with pytest.raises(ValueError, match="50 sets"):
        load.uniform_headers(per_request)


def test_latency_percentiles_are_nearest_rank() -> None:
    s = load.summarize_latencies([float(i) for i in range(100, 0, -1)])
    assert (s["p50"], s["p90"], s["p99"], s["p99.9"], s["max"]) == (50.0, 90.0, 99.0, 100.0, 100.0)
    assert s["mean"] == pytest.approx(50.5)
    assert load.summarize_latencies([])["p99"] is None


def test_h2load_failure_line_is_counted() -> None:
    out = "requests: 100 total, 100 started, 97 done, 95 succeeded, 5 failed, 2 errored, 1 timeout\n"
    assert load._h2load_failed(out) == 3


def _results(mode: str = "native", share: float | None = 0.1, **run_overrides) -> dict:
    run = {"kind": "fixed", "offered_rps": 500, "requests": 1000, "status": {"200": 900, "403": 100}, "errors": 0}
    run.update(run_overrides)
    entry = {"mode": mode, "probes": [{"name": "no token", "expect": 403, "got": 403}], "runs": [run]}
    if share is not None:
        entry["expected_denied_share"] = share
    scenario = {"connections": 16, "denied_share": 0.1, "mixer": {"check_cache_hit_percent": 0}}
    return {"scenario": scenario, "modes": [entry]}


def test_problems_flags_what_makes_a_run_unusable() -> None:
    assert runner.problems(_results()) == []
    assert runner.problems(_results(status={"200": 890, "403": 100, "503": 10})) == [
        "native fixed 500 req/s: answers other than 200 and 403: {'503': 10}"
    ]
    assert runner.problems(_results(errors=4)) == ["native fixed 500 req/s: 4 requests without an answer"]
    assert runner.problems(_results(requests=0, status={})) == ["native fixed 500 req/s: no requests completed"]
    bad_probe = _results()
    bad_probe["modes"][0]["probes"][0]["got"] = 200
    assert runner.problems(bad_probe) == ["native: probe 'no token' got 200, expected 403"]
    failed = {"modes": [{"mode": "mixer", "error": "central exited", "runs": []}]}
    assert runner.problems(failed) == ["mixer: central exited"]


def test_problems_check_the_share_of_403_against_the_mix() -> None:
    # 1000 answers, 10 % expected: 100 ± (16 connections + 2).
    assert runner.problems(_results(status={"200": 882, "403": 118})) == []
    assert runner.problems(_results(status={"200": 918, "403": 82})) == []
    assert runner.problems(_results(status={"200": 881, "403": 119})) == [
        "native fixed 500 req/s: 119 of 1000 answers were 403 (11.9%); the mix calls for 10.0%, 100 ± 18"
    ]
    # An enforcing mode that let everything through is caught by its share.
    assert runner.problems(_results(status={"200": 1000})) == [
        "native fixed 500 req/s: 0 of 1000 answers were 403 (0.0%); the mix calls for 10.0%, 100 ± 18"
    ]
    # A mode that enforces nothing must answer only 200.
    assert runner.problems(_results(mode="noop-extproc", share=0.0, status={"200": 1000})) == []
    assert runner.problems(_results(mode="noop-extproc", share=0.0)) == [
        "noop-extproc fixed 500 req/s: answers other than 200: {'403': 100}"
    ]
    # Without a recorded share (older results), the mode's kind and the scenario decide.
    assert runner.problems(_results(mode="extproc", share=None)) == []
    assert runner.problems(_results(mode="none", share=None, status={"200": 1000})) == []


def test_expected_share_and_tolerance() -> None:
    scenario = {"denied_share": 0.1, "mixer": {"check_cache_hit_percent": 50}}
    assert [runner.expected_denied_share(m, scenario) for m in runner.MODES] == [
        0.0,  # none
        0.1,  # native
        0.0,  # noop
        0.0,  # noop-http
        0.0,  # noop-extproc
        0.1,  # authz+als
        0.1,  # authz-http
        0.1,  # extproc
        0.05,  # mixer: half the Checks are skipped by the check-cache model, and let through
    ]
    assert runner.denied_tolerance(1000, 0.1, 16) == 18
    # mixer with a 50 % check cache: 200 denials in the list's share, each checked with p = 0.5.
    assert runner.denied_tolerance(2000, 0.05, 16, checked=0.5) == pytest.approx(18 + 5 * (200 * 0.25) ** 0.5)


def test_problems_report_a_memory_step_that_did_not_make_its_series() -> None:
    ok = {"modes": [], "memory": {"series_target": 10000, "series": 10000, "idle_rss_mib": 50.0}}
    assert runner.problems(ok) == []
    short = {"modes": [], "memory": {"series_target": 10000, "series": 9000}}
    assert runner.problems(short) == ["memory: extproc holds 9000 metric series, 10000 were asked for"]
    failed = {"modes": [], "memory": {"series_target": 10000, "error": "ProcessFailed: extproc exited"}}
    assert runner.problems(failed) == ["memory: ProcessFailed: extproc exited"]


# --- the empty ext_proc server ---------------------------------------------------------------------


def _headers(**values: str) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in values.items()]
    )


def _noop_stream(*messages: ep.ProcessingRequest) -> tuple[list[str], int]:
    """Drive the servicer: the kinds it answered, and how many messages it read before ending the stream."""
    read = 0

    async def requests() -> AsyncIterator[ep.ProcessingRequest]:
        nonlocal read
        for m in messages:
            read += 1
            yield m

    async def run() -> list[str]:
        return [r.WhichOneof("response") async for r in noop_extproc.NoopProcessor().Process(requests(), None)]

    return asyncio.run(run()), read


REQUEST = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=_headers(**{":path": "/a"})))
GRPC_REQUEST = ep.ProcessingRequest(
    request_headers=ep.HttpHeaders(headers=_headers(content_type="application/grpc+proto"))
)
RESPONSE = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=_headers(**{":status": "200"})))
TRAILERS = ep.ProcessingRequest(response_trailers=ep.HttpTrailers(trailers=_headers(grpc_status="0")))


def test_noop_extproc_answers_each_message_with_its_empty_reply_and_ends_after_response_headers() -> None:
    replies, read = _noop_stream(REQUEST, RESPONSE, TRAILERS)
    assert replies == ["request_headers", "response_headers"]
    assert read == 2  # ended itself: the trailers were never read
    body = ep.ProcessingRequest(request_body=ep.HttpBody(body=b"x"))
    assert _noop_stream(REQUEST, body, RESPONSE)[0] == ["request_headers", "request_body", "response_headers"]


def test_noop_extproc_waits_for_the_trailers_of_a_grpc_response_as_extproc_does() -> None:
    assert _noop_stream(GRPC_REQUEST, RESPONSE, TRAILERS) == (
        ["request_headers", "response_headers", "response_trailers"],
        3,
    )
    # A trailers-only answer (grpc-status in the headers) or a response that ends with its headers is over.
    trailers_only = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=_headers(grpc_status="7")))
    assert _noop_stream(GRPC_REQUEST, trailers_only, TRAILERS)[1] == 2
    ended = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=_headers(), end_of_stream=True))
    assert _noop_stream(GRPC_REQUEST, ended, TRAILERS)[1] == 2


def test_noop_extproc_sends_nothing_in_observability_mode_but_still_ends_the_stream() -> None:
    observed = [ep.ProcessingRequest(observability_mode=True) for _ in range(3)]
    observed[0].request_headers.CopyFrom(REQUEST.request_headers)
    observed[1].response_headers.CopyFrom(RESPONSE.response_headers)
    observed[2].response_trailers.CopyFrom(TRAILERS.response_trailers)
    assert _noop_stream(*observed) == ([], 2)


# --- the memory step's entries and counts -------------------------------------------------------------


def test_memory_entries_come_from_distinct_peers_where_extproc_reads_them() -> None:
    msgs = list(memory.messages(10, 250, batch=100))
    assert [len(m.http_logs.log_entry) for m in msgs] == [100, 100, 50]
    assert msgs[0].identifier.log_name == "inbound" and not msgs[1].HasField("identifier")
    seen = set()
    for m in msgs:
        for e in m.http_logs.log_entry:
            value = e.common_properties.metadata.filter_metadata[memory.AUTHZ_NAMESPACE].fields[peer.METADATA_HEADER]
            workload = peer.decode(value.string_value)
            assert workload is not None and workload.namespace == memory.CLIENT_NAMESPACE
            seen.add(workload.workload_name)
            assert e.response.response_code.value == 200
    assert seen == {memory.client(i).workload_name for i in range(10, 260)}


METRICS = """\
# HELP istio_requests_total Total requests.
# TYPE istio_requests_total counter
istio_requests_total{reporter="destination",source_workload="a b"} 3
istio_requests_total{reporter="destination",source_workload="c"} 1
# HELP istio_request_bytes Request sizes.
# TYPE istio_request_bytes histogram
istio_request_bytes_bucket{reporter="destination",source_workload="c",le="1"} 0
istio_request_bytes_bucket{reporter="destination",source_workload="c",le="+Inf"} 1
istio_request_bytes_sum{reporter="destination",source_workload="c"} 180
istio_request_bytes_count{reporter="destination",source_workload="c"} 1
istio_build{component="proxy",tag="1.0"} 1
# TYPE extproc_telemetry_series gauge
extproc_telemetry_series{metric="istio_requests_total"} 2.0
extproc_telemetry_series{metric="istio_request_bytes"} 1.0
extproc_telemetry_series_limit 50000.0
"""


def test_series_are_read_from_the_gauge_and_counted_in_the_standard_families() -> None:
    count = memory.count_series(METRICS)
    assert (count.gauge, count.counted, count.series) == (3, 3, 3)
    without_gauge = memory.count_series("\n".join(ln for ln in METRICS.splitlines() if "extproc_" not in ln))
    assert (without_gauge.gauge, without_gauge.series) == (None, 3)


def test_peers_needed_to_reach_the_target() -> None:
    assert memory.peers_needed(10_000, 40, 4.0) == 2490
    assert memory.peers_needed(10_000, 10_001, 4.0) == 0
    assert memory.peers_needed(10, 0, 3.0) == 4
    with pytest.raises(memory.SeriesNotCreated):
        memory.peers_needed(10_000, 0, 0.0)


def test_cli_options() -> None:
    o = cli.options(["--quick", "--modes", "none,mixer", "--http", "2", "--mixer-check-cache", "80"])
    assert o.modes == ["none", "mixer"] and o.protocol == "http2" and o.quick
    assert (o.rates, o.duration_s, o.saturation_duration_s) == ([200], 2.0, 2.0)
    assert o.mixer.check_cache_hit_percent == 80
    assert o.command.startswith("python -m bench --quick")
    assert o.memory_series == 10_000 and cli.options(["--memory-series", "0"]).memory_series == 0
    assert list(cli.options([]).modes) == [
        "none",
        "native",
        "noop",
        "noop-http",
        "noop-extproc",
        "authz+als",
        "authz-http",
        "extproc",
        "mixer",
    ]
    with pytest.raises(SystemExit):
        cli.options(["--modes", "none,istio"])
    with pytest.raises(SystemExit):
        cli.options(["--connections", "15", "--mixer-sidecars", "2"])
    with pytest.raises(SystemExit):
        cli.options(["--mixer-check-cache", "101"])
    with pytest.raises(SystemExit):
        cli.options(["--memory-series", "-1"])


def test_profile_summary_ranks_functions_by_own_and_inclusive_samples() -> None:
    from bench.harness import profile

    collapsed = "\n".join(
        [
            "main (app.py:10);serve (app.py:20);Check (authz.py:5) 6",
            "main (app.py:10);serve (app.py:21);Check (authz.py:9);evaluate (engine.py:3) 3",
            "main (app.py:10);loop (app.py:30) 1",
            "garbage line",
        ]
    )
    text = profile.summarize(collapsed, top=3)
    assert text.startswith("10 samples\n")
    own, inclusive = text.split("by inclusive")
    # Line numbers are merged per function: Check ran 6 of 10 samples itself, evaluate 3.
    assert "60.0%  Check (authz.py)" in own
    assert "30.0%  evaluate (engine.py)" in own
    assert own.index("Check") < own.index("evaluate")
    assert "100.0%  main (app.py)" in inclusive
    assert "90.0%  Check (authz.py)" in inclusive
    assert profile.summarize("") == "no samples\n"


def test_unix_sockets_point_the_sidecar_at_socket_paths(tmp_path: Path) -> None:
    cfg = topology.extproc_sidecar(
        "authz-http", ext_port=f"unix:{tmp_path}/g.sock", http_port=f"unix:{tmp_path}/c.sock", **PORTS
    )
    for cluster, name in (("extproc", "g.sock"), ("extproc_http", "c.sock")):
        endpoint = topology._cluster(cfg, cluster)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        assert endpoint["endpoint"]["address"] == {"pipe": {"path": f"{tmp_path}/{name}"}}
    _validate(cfg, tmp_path, "authz-http-unix")
    assert cli.options(["--unix-sockets"]).unix_sockets and not cli.options([]).unix_sockets
    assert runner.listen_text(f"unix:{tmp_path}/x.sock") == f"unix:{tmp_path}/x.sock"
    assert runner.listen_text(9001) == "127.0.0.1:9001"
