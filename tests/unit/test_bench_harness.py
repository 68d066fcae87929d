"""The benchmark harness's pure parts: scenario, Envoy configs, delay model, load scripts, checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import __main__ as cli
from bench.harness import load, runner, topology
from bench.harness import scenario as sc
from extproc.config import loader
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
    _validate(topology.extproc_sidecar("authz+als", ext_port=19003, **PORTS), tmp_path, "authz")
    _validate(topology.extproc_sidecar("extproc", ext_port=19003, **PORTS), tmp_path, "extproc")
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
    spec = load.LoadSpec([10000, 10001], 16, 5, 1000, ["/a", "/b"], {"authorization": "Bearer t"}, threads=2)
    script = load.wrk_script(spec)
    assert "function delay()" in script
    assert "local interval_ms = 2.000000" in script  # 2 threads share 1000 req/s: a slot every 2 ms each
    assert "local ports = {10000, 10001}" in script
    assert '["authorization"] = "Bearer t"' in script
    closed = load.wrk_script(load.LoadSpec([10000], 16, 5, None, ["/a"], {}, threads=1))
    assert "function delay()" not in closed


def test_latency_percentiles_are_nearest_rank() -> None:
    s = load.summarize_latencies([float(i) for i in range(100, 0, -1)])
    assert (s["p50"], s["p90"], s["p99"], s["p99.9"], s["max"]) == (50.0, 90.0, 99.0, 100.0, 100.0)
    assert s["mean"] == pytest.approx(50.5)
    assert load.summarize_latencies([])["p99"] is None


def test_h2load_failure_line_is_counted() -> None:
    out = "requests: 100 total, 100 started, 97 done, 95 succeeded, 5 failed, 2 errored, 1 timeout\n"
    assert load._h2load_failed(out) == 3


def _results(**run_overrides) -> dict:
    run = {"kind": "fixed", "offered_rps": 500, "requests": 100, "status": {"200": 100}, "errors": 0}
    run.update(run_overrides)
    return {"modes": [{"mode": "native", "probes": [{"name": "no token", "expect": 403, "got": 403}], "runs": [run]}]}


def test_problems_flags_what_makes_a_run_unusable() -> None:
    assert runner.problems(_results()) == []
    assert runner.problems(_results(status={"200": 90, "503": 10})) == [
        "native fixed 500 req/s: non-200 answers {'503': 10}"
    ]
    assert runner.problems(_results(errors=4)) == ["native fixed 500 req/s: 4 requests without an answer"]
    assert runner.problems(_results(requests=0, status={})) == ["native fixed 500 req/s: no requests completed"]
    bad_probe = _results()
    bad_probe["modes"][0]["probes"][0]["got"] = 200
    assert runner.problems(bad_probe) == ["native: probe 'no token' got 200, expected 403"]
    failed = {"modes": [{"mode": "mixer", "error": "central exited", "runs": []}]}
    assert runner.problems(failed) == ["mixer: central exited"]


def test_cli_options() -> None:
    o = cli.options(["--quick", "--modes", "none,mixer", "--http", "2", "--mixer-check-cache", "80"])
    assert o.modes == ["none", "mixer"] and o.protocol == "http2" and o.quick
    assert (o.rates, o.duration_s, o.saturation_duration_s) == ([200], 2.0, 2.0)
    assert o.mixer.check_cache_hit_percent == 80
    assert o.command.startswith("python -m bench --quick")
    with pytest.raises(SystemExit):
        cli.options(["--modes", "none,istio"])
    with pytest.raises(SystemExit):
        cli.options(["--connections", "15", "--mixer-sidecars", "2"])
    with pytest.raises(SystemExit):
        cli.options(["--mixer-check-cache", "101"])


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
