"""The `extproc` command.

extproc serve    --config-dir DIR ... --listen ADDR --admin ADDR --namespace NS --labels k=v,...
extproc validate --config-dir DIR ... [--namespace NS --labels k=v,...]
extproc explain  --config-dir DIR ... --namespace NS [--labels k=v,...] --request JSON|@FILE
extproc demo     [--check] [--mode authz|authz-http|extproc]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from extproc import __version__

if TYPE_CHECKING:
    from extproc.snapshot.compiled import WorkloadIdentity


def _workload(ns: argparse.Namespace, labels: dict[str, str]) -> WorkloadIdentity:
    """The workload named by the validate/explain flags."""
    from extproc.snapshot.compiled import WorkloadIdentity

    return WorkloadIdentity(
        ns.namespace,
        labels,
        root_namespace=ns.root_namespace,
        trust_domain=ns.trust_domain,
        trust_domain_aliases=tuple(ns.trust_domain_aliases or ()),
    )


def _cmd_serve(ns: argparse.Namespace) -> int:
    from extproc.server.app import run
    from extproc.server.settings import SettingsError, serve_settings

    try:
        settings = serve_settings(ns)
    except SettingsError as e:
        print(f"extproc serve: {e}", file=sys.stderr)
        return 2
    return run(settings)


def _cmd_analyze(ns: argparse.Namespace) -> int:
    from extproc import analyze
    from extproc.config.errors import ConfigError
    from extproc.snapshot import loader

    try:
        workloads = [analyze.parse_workload(w) for w in ns.workload or ()]
        threshold = analyze.Level.parse(ns.failure_threshold)
    except ValueError as e:
        print(f"extproc analyze: {e}", file=sys.stderr)
        return 2
    try:
        loaded = loader.load(ns.config_dirs)
    except ConfigError as e:  # invalid config is validate's business; say so and stop
        print(e, file=sys.stderr)
        return 1
    messages = analyze.Analysis(loaded, workloads, ns.root_namespace).run()
    sys.stdout.write(analyze.render(messages, ns.output))
    return analyze.exit_status(messages, threshold)


def _cmd_envoy_config(ns: argparse.Namespace) -> int:
    from extproc.envoy_config import build_options, generate
    from extproc.envoy_config.options import ADDRESS_FIELDS

    try:
        opts = build_options(
            ns.mode, ns.direction, no_tcp=ns.no_tcp, **{name: getattr(ns, name) for name in ADDRESS_FIELDS}
        )
    except ValueError as e:
        print(f"extproc envoy-config: {e}", file=sys.stderr)
        return 2
    text = generate(opts)
    if ns.output is None:
        sys.stdout.write(text)
    else:
        Path(ns.output).write_text(text)
    return 0


def _cmd_validate(ns: argparse.Namespace) -> int:
    from extproc.config.errors import ConfigError
    from extproc.snapshot import loader
    from extproc.snapshot.compiled import Options, build_snapshot
    from extproc.workload import LabelsError, parse_labels

    try:
        loaded = loader.load(ns.config_dirs)
    except ConfigError as e:
        print(e, file=sys.stderr)
        for w in e.issues:
            if w.warning:
                print("  " + w.render(), file=sys.stderr)
        return 1
    for w in loaded.warnings:
        print(w.render(), file=sys.stderr)
    print(
        f"ok: {len(loaded.policies)} AuthorizationPolicies and {len(loaded.request_authentications)} "
        f"RequestAuthentications in {len(loaded.files)} files"
    )
    if ns.namespace:
        try:
            labels = parse_labels(ns.labels or "")
        except LabelsError as e:
            print(f"extproc validate: {e}", file=sys.stderr)
            return 2
        snap = build_snapshot(loaded, _workload(ns, labels), Options(), 1)
        for p in snap.policies:
            print(f"  applies: {p.ref.namespace}/{p.ref.name} ({p.ref.action}{', dry-run' if p.ref.dry_run else ''})")
        for prov in snap.authn.providers:
            if prov.inline_keys is not None:
                keys = "inline jwks"
            else:
                keys = (prov.remote.jwks_uri if prov.remote else None) or "OpenID discovery"
            iss = prov.issuer or "(any)"
            print(f"  applies: RequestAuthentication {prov.origin}: issuer {iss} ({prov.name}, keys: {keys})")
        for name, why in snap.ignored_policies:
            print(f"  ignored: {name}: {why}")
    return 0


def _cmd_explain(ns: argparse.Namespace) -> int:
    from extproc.authz import engine
    from extproc.config.errors import ConfigError
    from extproc.debug import attributes_from_description
    from extproc.snapshot.compiled import Options
    from extproc.snapshot.reload import load_snapshot
    from extproc.workload import parse_labels

    text = ns.request
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        labels = parse_labels(ns.labels or "")
        attrs = attributes_from_description(json.loads(text))
    except ValueError as e:
        print(f"extproc explain: {e}", file=sys.stderr)
        return 2
    try:
        snap = load_snapshot(ns.config_dirs, _workload(ns, labels), Options(), 1)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    program = snap.http if attrs.is_http else snap.tcp
    hits, bad = engine.custom_providers(program, attrs)
    if bad is not None:
        decision = engine.bad_custom_decision(program, bad)
    else:
        for provider, rule in hits:
            print(f"CUSTOM: {rule} matched: provider {provider} would be called first")
        decision = engine.evaluate(program, attrs)
    for t in engine.trace(program, attrs):
        mark = "MATCH" if t.matched else "-    "
        tag = f"{t.action}{' dry-run' if t.dry_run else ''}"
        print(f"{mark} {tag:14} {t.rule_id}" + ("" if t.matched else f": {t.why_not}"))
    print(f"decision: {decision.engine_result.upper()} ({decision.reason})")
    return 0 if decision.allowed else 3


def _cmd_demo(ns: argparse.Namespace) -> int:
    from extproc.demo import run_demo

    return run_demo(check=ns.check, mode=ns.mode)


def _add_workload_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config-dir", action="append", dest="config_dirs", required=True, metavar="DIR")
    p.add_argument("--namespace", required=required, metavar="NS")
    p.add_argument("--labels", metavar="k=v[,k=v...]")
    p.add_argument("--root-namespace", default="istio-system", metavar="NS")
    p.add_argument("--trust-domain", default="cluster.local", metavar="TD")
    p.add_argument("--trust-domain-alias", action="append", dest="trust_domain_aliases", metavar="TD")


def build_parser() -> argparse.ArgumentParser:
    from extproc.server.settings import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="extproc", description="Istio authorization and telemetry for Envoy, in the data plane."
    )
    parser.add_argument("--version", action="version", version=f"extproc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_authz gRPC server")
    add_serve_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    validate = sub.add_parser("validate", help="check policy files; with --namespace, show which apply")
    _add_workload_flags(validate, required=False)
    validate.set_defaults(func=_cmd_validate)

    analyze = sub.add_parser(
        "analyze",
        help="report config that is valid but ineffective, as Istio's analyzers do (istioctl analyze)",
        description="Report config that is valid but does not do what it says, with Istio's analyzer codes "
        "(IST0101, IST0127, IST0159, IST0160) and extproc's own (EXT0001-EXT0004). Exits 79 when a message is "
        "at or above --failure-threshold, as istioctl does.",
    )
    analyze.add_argument("config_dirs", nargs="+", metavar="CONFIG_DIR")
    analyze.add_argument(
        "--workload",
        action="append",
        metavar="NAMESPACE[:k=v,...]",
        help="a workload that exists (repeat); with the config's WorkloadEntry resources, what selectors are "
        "checked against. Without any, the does-anything-match analyzers do not run",
    )
    analyze.add_argument(
        "--root-namespace", default="istio-system", help="Istio's root namespace (default istio-system)"
    )
    analyze.add_argument("--output", "-o", choices=("text", "json", "yaml"), default="text")
    analyze.add_argument(
        "--failure-threshold", default="Error", metavar="LEVEL", help="Info, Warning or Error (default Error)"
    )
    analyze.set_defaults(func=_cmd_analyze)

    envoy = sub.add_parser(
        "envoy-config",
        help="print the Envoy bootstrap of a mode and side (the files in envoy/ are its output)",
        description="Print a complete, commented Envoy bootstrap for extproc, built from Envoy's typed API "
        "(envoy-data-plane). With the default addresses it prints the files shipped in envoy/. Check the result "
        "with `envoy --mode validate -c FILE`.",
    )
    envoy.add_argument("--mode", choices=("authz+als", "authz", "authz-http", "extproc"), default="authz+als")
    envoy.add_argument("--direction", choices=("inbound", "outbound"), default="inbound")
    from extproc.envoy_config.options import ADDRESS_FIELDS, Side, defaults

    inbound, outbound = defaults(Side.INBOUND), defaults(Side.OUTBOUND)
    helps = {
        "listen": "the HTTP listener",
        "tcp_listen": "the TCP listener",
        "upstream": "where HTTP goes: the application (inbound) or the server's sidecar (outbound)",
        "tcp_upstream": "where TCP goes",
        "extproc": "extproc's gRPC listener, its --listen",
        "extproc_http": "extproc's HTTP check listener, its --http-listen (mode authz-http)",
        "admin": "Envoy's admin listener",
    }
    for name in ADDRESS_FIELDS:
        default = f"inbound {inbound[name] or 'as --upstream'}, outbound {outbound[name]}"
        envoy.add_argument(
            f"--{name.replace('_', '-')}", dest=name, metavar="HOST:PORT", help=f"{helps[name]} ({default})"
        )
    envoy.add_argument("--no-tcp", action="store_true", help="no TCP listener")
    envoy.add_argument("--output", "-o", metavar="FILE", help="write here instead of standard output")
    envoy.set_defaults(func=_cmd_envoy_config)

    explain = sub.add_parser("explain", help="evaluate one described request and show every rule's result")
    _add_workload_flags(explain, required=True)
    explain.add_argument(
        "--request", required=True, metavar="JSON|@FILE", help="request description (see extproc.debug)"
    )
    explain.set_defaults(func=_cmd_explain)

    demo = sub.add_parser("demo", help="run Envoy, extproc, a sample upstream and sample policies on this machine")
    demo.add_argument("--check", action="store_true", help="send the sample requests, print the results and exit")
    demo.add_argument(
        "--mode",
        choices=("authz", "authz-http", "extproc"),
        default="authz",
        help="authz: ext_authz + access logs (envoy/authz.yaml); authz-http: the same with HTTP checks "
        "(envoy/authz-http.yaml); extproc: one ext_proc filter (envoy/extproc.yaml)",
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
