"""WorkloadEntry and ServiceEntry: read with Istio's field names, checked by Istio's rules
(its webhook, pkg/config/validation, and the CRD's limits), all-or-nothing like every kind."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from extproc.config.errors import ConfigError
from extproc.config.models import Location, Resolution, ServiceEntry, WorkloadEntry
from extproc.snapshot import loader

WE_HEAD = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm, namespace: foo}\n"
SE_HEAD = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext, namespace: foo}\n"
AP = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: foo}\nspec: {}\n"


def write(d: Path, name: str, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(textwrap.dedent(text))
    return p


def doc(head: str, spec: str) -> str:
    return head + "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n"


def issues_of(d: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a load that must fail."""
    with pytest.raises(ConfigError) as e:
        loader.load([d])
    return (
        [i.render() for i in e.value.issues if not i.warning],
        [i.render() for i in e.value.issues if i.warning],
    )


def errors_of(d: Path) -> list[str]:
    return issues_of(d)[0]


def warnings_of(d: Path) -> list[str]:
    return [w.render() for w in loader.load([d]).warnings]


# --- valid documents -------------------------------------------------------------------


def test_loads_workload_and_service_entries_of_every_version(tmp_path: Path) -> None:
    write(
        tmp_path,
        "entries.yaml",
        """
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: vm1, namespace: foo, labels: {app: vm}}
        spec:
          address: 10.0.0.5
          ports: {http: 8080, grpc-web: 9090}
          labels: {app: ratings, version: v1, topology.istio.io/cluster: east}
          network: net1
          locality: us/us-east-1/az-1
          weight: 3
          serviceAccount: ratings-sa
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: WorkloadEntry
        metadata: {name: vm2, namespace: foo}
        spec: {address: vm2.example.com}
        ---
        apiVersion: networking.istio.io/v1alpha3
        kind: WorkloadEntry
        metadata: {name: sock, namespace: foo}
        spec: {address: "unix:///var/run/app.sock"}
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ext, namespace: foo}
        spec:
          hosts: [api.example.com]
          addresses: [192.0.2.10, 2001:db8::/64]
          ports:
          - {number: 443, name: https, protocol: tls}
          - {number: 80, name: http, protocol: HTTP, targetPort: 8080}
          location: MESH_INTERNAL
          resolution: STATIC
          endpoints:
          - {address: 192.0.2.1, ports: {https: 8443}, labels: {app: ext}, serviceAccount: ext-sa}
          - {address: "2001:db8::1", weight: 2}
          exportTo: [".", bar]
          subjectAltNames: [spiffe://cluster.local/ns/foo/sa/ext-sa]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: dns, namespace: foo}
        spec:
          hosts: [db.example.com]
          ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
          resolution: DNS_ROUND_ROBIN
          endpoints: [{address: db-primary.example.com}]
        ---
        apiVersion: networking.istio.io/v1alpha3
        kind: ServiceEntry
        metadata: {name: selected, namespace: foo}
        spec:
          hosts: [vms.foo.svc.cluster.local, "*.vms.example.com"]
          ports: [{number: 80, name: http, protocol: HTTP}]
          resolution: STATIC
          workloadSelector: {labels: {app: ratings}}
        """,
    )
    loaded = loader.load([tmp_path])
    assert loaded.warnings == []
    assert [lp.policy.metadata.name for lp in loaded.workload_entries] == ["vm1", "vm2", "sock"]
    assert [lp.policy.metadata.name for lp in loaded.service_entries] == ["ext", "dns", "selected"]
    assert loaded.policies == [] and loaded.request_authentications == []

    vm1 = loaded.workload_entries[0]
    assert isinstance(vm1.policy, WorkloadEntry)
    spec = vm1.policy.spec
    assert spec.address == "10.0.0.5"
    assert spec.ports == {"http": 8080, "grpc-web": 9090}
    assert spec.labels == {"app": "ratings", "version": "v1", "topology.istio.io/cluster": "east"}
    assert (spec.network, spec.locality, spec.weight, spec.service_account) == (
        "net1",
        "us/us-east-1/az-1",
        3,
        "ratings-sa",
    )
    assert vm1.location.file == str(tmp_path / "entries.yaml") and vm1.location.document == 1
    assert vm1.location.resource == "WorkloadEntry foo/vm1"
    assert loaded.workload_entries[2].policy.spec.address == "unix:///var/run/app.sock"

    ext = loaded.service_entries[0]
    assert isinstance(ext.policy, ServiceEntry) and ext.location.document == 4
    se = ext.policy.spec
    assert se.hosts == ["api.example.com"] and se.addresses == ["192.0.2.10", "2001:db8::/64"]
    assert se.location is Location.MESH_INTERNAL and se.resolution is Resolution.STATIC
    assert [(p.number, p.name, p.protocol, p.target_port) for p in se.ports or ()] == [
        (443, "https", "tls", 0),
        (80, "http", "HTTP", 8080),
    ]
    assert se.endpoints is not None and len(se.endpoints) == 2
    assert se.endpoints[0].ports == {"https": 8443} and se.endpoints[0].service_account == "ext-sa"
    assert se.endpoints[1].weight == 2 and se.endpoints[1].ports is None
    assert se.export_to == [".", "bar"]
    assert se.subject_alt_names == ["spiffe://cluster.local/ns/foo/sa/ext-sa"]

    dns = loaded.service_entries[1].policy.spec
    assert dns.resolution is Resolution.DNS_ROUND_ROBIN and dns.location is Location.MESH_EXTERNAL
    selected = loaded.service_entries[2].policy.spec
    assert selected.workload_selector is not None and selected.workload_selector.labels == {"app": "ratings"}
    assert selected.endpoints is None


def test_defaults(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", doc(SE_HEAD, "hosts: [a.example.com]\naddresses: [10.1.0.0/16]"))
    write(tmp_path, "b.yaml", doc(WE_HEAD, "address: 1.2.3.4"))
    loaded = loader.load([tmp_path])
    se = loaded.service_entries[0].policy.spec
    assert se.location is Location.MESH_EXTERNAL and se.resolution is Resolution.NONE
    assert se.ports is None and se.endpoints is None and se.workload_selector is None
    we = loaded.workload_entries[0].policy.spec
    assert (we.ports, we.labels, we.network, we.locality, we.weight, we.service_account) == (None, None, "", "", 0, "")


def test_entries_inside_a_list(tmp_path: Path) -> None:
    write(
        tmp_path,
        "list.yaml",
        """
        apiVersion: v1
        kind: List
        items:
        - apiVersion: networking.istio.io/v1
          kind: WorkloadEntry
          metadata: {name: vm, namespace: foo}
          spec: {address: 10.0.0.1}
        - apiVersion: networking.istio.io/v1
          kind: WorkloadEntry
          metadata: {name: bad, namespace: foo}
          spec: {address: 10.0.0.1, ports: {http: 0}}
        """,
    )
    [err] = errors_of(tmp_path)
    assert "list.yaml: document 1 (WorkloadEntry foo/bad), line 12" in err
    assert "items[1].spec.ports.http: port number 0 must be in the range 1..65535" in err


# --- all-or-nothing, duplicates, versions, namespace ----------------------------------------


def test_a_bad_workload_entry_rejects_the_whole_load(tmp_path: Path) -> None:
    write(tmp_path, "a-policy.yaml", AP)
    write(
        tmp_path, "b-entry.yaml", doc(SE_HEAD, "hosts: [a.example.com]") + "---\n" + doc(WE_HEAD, "address: 10.0.0.300")
    )
    with pytest.raises(ConfigError) as e:
        loader.load([tmp_path])
    [err] = [i for i in e.value.issues if not i.warning]
    assert err.location.file == str(tmp_path / "b-entry.yaml")
    assert err.location.document == 2 and err.location.line == 11
    assert err.location.resource == "WorkloadEntry foo/vm"
    assert err.field == "spec.address"
    assert "'10.0.0.300' is not a valid FQDN or an IP address" in err.message


def test_a_bad_service_entry_next_to_good_resources_rejects_the_load(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", AP + "---\n" + doc(WE_HEAD, "address: 10.0.0.1"))
    write(tmp_path, "b.yaml", doc(SE_HEAD, "hosts: ['*']"))
    [err] = errors_of(tmp_path)
    assert err.startswith(f"{tmp_path / 'b.yaml'}: document 1 (ServiceEntry foo/ext), line 5: error: spec.hosts[0]: ")
    assert "cannot be the full wildcard" in err


def test_duplicates(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", doc(WE_HEAD, "address: 10.0.0.1") + "---\n" + doc(SE_HEAD, "hosts: [a.example.com]"))
    write(tmp_path, "b.yaml", doc(WE_HEAD, "address: 10.0.0.2") + "---\n" + doc(SE_HEAD, "hosts: [b.example.com]"))
    errs = errors_of(tmp_path)
    assert len(errs) == 2
    assert "b.yaml: document 1" in errs[0] and "duplicate WorkloadEntry, first defined in" in errs[0]
    assert f"{tmp_path / 'a.yaml'}: document 1" in errs[0]
    assert "b.yaml: document 2" in errs[1] and "duplicate ServiceEntry, first defined in" in errs[1]


def test_same_name_in_another_namespace_or_kind_is_no_duplicate(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", doc(WE_HEAD, "address: 10.0.0.1"))
    write(tmp_path, "b.yaml", doc(WE_HEAD.replace("namespace: foo", "namespace: bar"), "address: 10.0.0.1"))
    write(tmp_path, "c.yaml", doc(SE_HEAD.replace("name: ext", "name: vm"), "hosts: [a.example.com]"))
    loaded = loader.load([tmp_path])
    assert len(loaded.workload_entries) == 2 and len(loaded.service_entries) == 1


@pytest.mark.parametrize("kind", ["WorkloadEntry", "ServiceEntry"])
@pytest.mark.parametrize("version", ["networking.istio.io/v1alpha2", "networking.istio.io/v2"])
def test_unsupported_networking_version(tmp_path: Path, kind: str, version: str) -> None:
    write(
        tmp_path, "e.yaml", f"apiVersion: {version}\nkind: {kind}\nmetadata: {{name: e, namespace: foo}}\nspec: {{}}\n"
    )
    [err] = errors_of(tmp_path)
    assert f"e.yaml: document 1 ({kind} foo/e), line 1: error: apiVersion: unsupported version {version}" in err
    assert "networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3" in err


def test_other_networking_kinds_are_ignored_with_a_warning(tmp_path: Path) -> None:
    write(
        tmp_path,
        "vs.yaml",
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: vs, namespace: foo}
        spec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}
        ---
        apiVersion: networking.istio.io/v1alpha3
        kind: DestinationRule
        metadata: {name: dr, namespace: foo}
        spec: {host: a}
        ---
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {name: default, namespace: foo}
        spec: {}
        """,
    )
    warnings = warnings_of(tmp_path)
    assert len(warnings) == 3
    assert "ignored: networking.istio.io/v1 VirtualService is not used by extproc" in warnings[0]
    assert "DestinationRule is not used" in warnings[1] and "Sidecar is not used" in warnings[2]


def test_namespace_is_required(tmp_path: Path) -> None:
    write(tmp_path, "e.yaml", doc(WE_HEAD.replace(", namespace: foo", ""), "address: 10.0.0.1"))
    [err] = errors_of(tmp_path)
    assert "e.yaml: document 1 (WorkloadEntry vm)" in err and "metadata.namespace: required" in err


def test_dry_run_annotation_is_refused(tmp_path: Path) -> None:
    head = WE_HEAD.replace("namespace: foo}", "namespace: foo, annotations: {istio.io/dry-run: 'true'}}")
    write(tmp_path, "e.yaml", doc(head, "address: 10.0.0.1"))
    [err] = errors_of(tmp_path)
    assert "metadata.annotations.istio.io/dry-run: unsupported annotation" in err


# --- the shape: numbers are numbers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "spec", "field", "message"),
    [
        (WE_HEAD, "address: 10.0.0.1\nports: {http: '8080'}", "spec.ports.http", "must be an integer, got str '8080'"),
        (WE_HEAD, "address: 10.0.0.1\nweight: '3'", "spec.weight", "must be an integer, got str"),
        (WE_HEAD, "address: 10.0.0.1\nweight: 1.5", "spec.weight", "must be an integer, got float"),
        (WE_HEAD, "address: 10.0.0.1\nports: {http: true}", "spec.ports.http", "must be an integer, got bool"),
        (
            SE_HEAD,
            "hosts: [a.example.com]\nports: [{number: '443', name: https}]",
            "spec.ports[0].number",
            "must be an integer, got str '443' (remove the quotes in YAML)",
        ),
        (
            SE_HEAD,
            "hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{address: 1.2.3.4, ports: {http: '80'}}]",
            "spec.endpoints[0].ports.http",
            "must be an integer",
        ),
        (WE_HEAD, "address: 10.0.0.1\nport: {http: 80}", "spec.port", "unknown field"),
        (WE_HEAD, "address: 10.0.0.1\nlabels: {app: 1}", "spec.labels.app", "must be a string, got int"),
        (SE_HEAD, "ports: [{number: 80, name: http}]", "spec.hosts", "required field is missing"),
        (SE_HEAD, "hosts: [a.example.com]\nports: [{name: http}]", "spec.ports[0].number", "required field is missing"),
        (SE_HEAD, "hosts: [a.example.com]\nresolution: dns", "spec.resolution", "must be one of NONE, STATIC, DNS"),
        (SE_HEAD, "hosts: [a.example.com]\nlocation: EXTERNAL", "spec.location", "must be one of MESH_EXTERNAL"),
        (
            SE_HEAD,
            "hosts: [a.example.com]\nworkloadSelector: {matchLabels: {app: a}}",
            "spec.workloadSelector.matchLabels",
            "unknown field",
        ),
    ],
)
def test_shape_errors(tmp_path: Path, head: str, spec: str, field: str, message: str) -> None:
    write(tmp_path, "e.yaml", doc(head, spec))
    [err] = errors_of(tmp_path)
    assert "e.yaml: document 1 (" in err and f"error: {field}: " in err and message in err, err


def test_a_service_entry_needs_a_spec(tmp_path: Path) -> None:
    write(tmp_path, "e.yaml", SE_HEAD)
    [err] = errors_of(tmp_path)
    assert "spec: required field is missing" in err


# --- WorkloadEntry rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ("ports: {http: 80}", "spec.address", "address is required"),
        ("address: ''", "spec.address", "address is required"),
        ("address: 10.0.0.256", "spec.address", "is not a valid FQDN or an IP address"),
        ("address: '*.example.com'", "spec.address", "is not a valid FQDN or an IP address"),
        ("address: vm_1.example.com", "spec.address", "label 'vm_1' invalid"),
        ("address: a.123", "spec.address", "cannot be all-numeric"),
        ("address: 'http://vm.example.com'", "spec.address", "is not a valid FQDN"),
        ("address: 10.0.0.0/24", "spec.address", "is not a valid FQDN or an IP address"),
        (f"address: {'a' * 64}.example.com", "spec.address", "invalid"),
        ("address: 'unix://relative/path'", "spec.address", "relative/path is not an absolute path to a file"),
        ("address: 'unix:///var/run/'", "spec.address", "is not an absolute path to a file"),
        ("address: 'unix://'", "spec.address", "unix address must not be empty"),
        ("address: 'unix:///var/run/a.sock'\nports: {http: 80}", "spec.ports", "must not include ports"),
        ("address: 10.0.0.1\nports: {http: 0}", "spec.ports.http", "port number 0 must be in the range 1..65535"),
        ("address: 10.0.0.1\nports: {http: 65536}", "spec.ports.http", "port number 65536 must be in the range"),
        ("address: 10.0.0.1\nports: {http_web: 80}", "spec.ports.http_web", "invalid port name 'http_web'"),
        ("address: 10.0.0.1\nports: {-http: 80}", "spec.ports.-http", "invalid port name"),
        (f"address: 10.0.0.1\nports: {{{'p' * 63}: 80}}", f"spec.ports.{'p' * 63}", "shorter than 63 characters"),
        ("address: 10.0.0.1\nlabels: {'-app': a}", "spec.labels.-app", "invalid label key '-app'"),
        ("address: 10.0.0.1\nlabels: {'a/b/c': a}", "spec.labels.a/b/c", "invalid label key"),
        (f"address: 10.0.0.1\nlabels: {{{'k' * 64}: a}}", f"spec.labels.{'k' * 64}", "name is longer than 63"),
        ("address: 10.0.0.1\nlabels: {app: 'a b'}", "spec.labels.app", "invalid label value 'a b'"),
        ("address: 10.0.0.1\nlabels: {app: '-a'}", "spec.labels.app", "invalid label value"),
        ("address: 10.0.0.1\nweight: -1", "spec.weight", "must be between 0 and 4294967295, got -1"),
        ("address: 10.0.0.1\nweight: 4294967296", "spec.weight", "must be between 0 and 4294967295"),
        (f"address: 10.0.0.1\nserviceAccount: {'s' * 254}", "spec.serviceAccount", "at most 253 characters"),
        (f"address: 10.0.0.1\nnetwork: {'n' * 2049}", "spec.network", "at most 2048 characters"),
        (f"address: 10.0.0.1\nlocality: {'l' * 2049}", "spec.locality", "at most 2048 characters"),
    ],
)
def test_invalid_workload_entries(tmp_path: Path, spec: str, field: str, message: str) -> None:
    write(tmp_path, "we.yaml", doc(WE_HEAD, spec))
    [err] = errors_of(tmp_path)
    assert err.startswith(f"{tmp_path / 'we.yaml'}: document 1 (WorkloadEntry foo/vm), line "), err
    assert f"error: {field}: " in err and message in err, err


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", "2001:db8::1", "fe80::1%eth0", "vm.example.com", "vm.example.com.", "vm", "unix://@abstract"],
)
def test_valid_workload_entry_addresses(tmp_path: Path, address: str) -> None:
    write(tmp_path, "we.yaml", doc(WE_HEAD, f"address: '{address}'"))
    loaded = loader.load([tmp_path])
    assert loaded.workload_entries[0].policy.spec.address == address and loaded.warnings == []


def test_an_address_may_be_left_empty_with_a_network_with_a_warning(tmp_path: Path) -> None:
    write(tmp_path, "we.yaml", doc(WE_HEAD, "network: net2\nlabels: {app: a}"))
    [warning] = warnings_of(tmp_path)
    assert "spec.address: address is unset with network 'net2'" in warning


def test_every_workload_entry_error_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "we.yaml", doc(WE_HEAD, "address: 'not ip'\nports: {http: 0, bad_name: 80}\nlabels: {'a*': b}"))
    errs = errors_of(tmp_path)
    assert len(errs) == 4, errs
    assert "line 5" in errs[0] and "spec.address" in errs[0]
    assert any("spec.ports.http: port number 0" in e and "line 6" in e for e in errs)
    assert any("spec.ports.bad_name: invalid port name" in e for e in errs)
    assert any("spec.labels.a*: invalid label key" in e and "line 7" in e for e in errs)


# --- ServiceEntry rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        # hosts
        ("hosts: []", "spec.hosts", "service entry must have at least one host"),
        ("hosts: ['*']", "spec.hosts[0]", "invalid host *"),
        ("hosts: [a.example.com, 'a*b.example.com']", "spec.hosts[1]", "label 'a*b' invalid"),
        ("hosts: ['foo.*.com']", "spec.hosts[0]", "label '*' invalid"),
        ("hosts: ['a..com']", "spec.hosts[0]", "label '' invalid"),
        ("hosts: ['']", "spec.hosts[0]", "empty domain name not allowed"),
        ("hosts: [a.example.123]", "spec.hosts[0]", "cannot be all-numeric"),
        (f"hosts: [{'a' * 250}.example.com]", "spec.hosts[0]", "too long (max 255)"),
        # addresses
        (
            "hosts: [a.example.com]\naddresses: [10.0.0.1/33]",
            "spec.addresses[0]",
            "10.0.0.1/33 is not a valid CIDR block",
        ),
        ("hosts: [a.example.com]\naddresses: [10.0.0.0/08]", "spec.addresses[0]", "is not a valid CIDR block"),
        ("hosts: [a.example.com]\naddresses: [10.0.0.0/255.0.0.0]", "spec.addresses[0]", "not a valid CIDR block"),
        ("hosts: [a.example.com]\naddresses: [a.example.com]", "spec.addresses[0]", "a.example.com is not a valid IP"),
        ("hosts: [a.example.com]\naddresses: [1.2.3.4/8/8]", "spec.addresses[0]", "is not a valid IP"),
        (
            "hosts: [a.example.com]\naddresses: [10.0.0.0/8]\nresolution: DNS",
            "spec.addresses",
            "CIDR addresses are allowed only for NONE/STATIC resolution types",
        ),
        # ports
        ("hosts: [a.example.com]\nports: [{number: 0, name: http}]", "spec.ports[0].number", "port number 0 must be"),
        ("hosts: [a.example.com]\nports: [{number: 70000, name: h}]", "spec.ports[0].number", "in the range 1..65535"),
        ("hosts: [a.example.com]\nports: [{number: 80}]", "spec.ports[0].name", "required field is missing"),
        ("hosts: [a.example.com]\nports: [{number: 80, name: ''}]", "spec.ports[0].name", "invalid port name ''"),
        ("hosts: [a.example.com]\nports: [{number: 80, name: Http_1}]", "spec.ports[0].name", "invalid port name"),
        (
            "hosts: [a.example.com]\nports: [{number: 80, name: http}, {number: 81, name: http}]",
            "spec.ports[1].name",
            "service entry port name 'http' already defined",
        ),
        (
            "hosts: [a.example.com]\nports: [{number: 80, name: http}, {number: 80, name: web}]",
            "spec.ports[1].number",
            "service entry port 80 already defined",
        ),
        (
            "hosts: [a.example.com]\nports: [{number: 80, name: http, protocol: SOAP}]",
            "spec.ports[0].protocol",
            "unsupported protocol: SOAP",
        ),
        (
            "hosts: [a.example.com]\nports: [{number: 80, name: http, protocol: HTTP3}]",
            "spec.ports[0].protocol",
            "unsupported protocol: HTTP3",
        ),
        (
            "hosts: [a.example.com]\nports: [{number: 80, name: http, targetPort: 70000}]",
            "spec.ports[0].targetPort",
            "port number 70000",
        ),
        (
            "hosts: [a.example.com]\nports: [{number: 80, name: http, targetPort: 0}]",
            "spec.ports[0].targetPort",
            "port number 0",
        ),
        # endpoints and workloadSelector
        (
            "hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{address: 1.2.3.4}]\nworkloadSelector: {labels: {app: a}}",
            "spec",
            "only one of workloadSelector or endpoints can be set",
        ),
        (
            "hosts: [a.example.com]\nendpoints: [{address: 1.2.3.4}]",
            "spec.endpoints",
            "no endpoints should be provided for resolution type NONE",
        ),
        (
            "hosts: [a.example.com]\nresolution: NONE\nendpoints: []",
            "spec.endpoints",
            "no endpoints should be provided for resolution type NONE",
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{address: a.example.com}]",
            "spec.endpoints[0].address",
            "endpoint address 'a.example.com' is not a valid IP address (resolution STATIC)",
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{address: 1.2.3.4}, {labels: {app: a}}]",
            "spec.endpoints[1].address",
            "address is required",
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nports: [{number: 80, name: http}]\n"
            "endpoints: [{address: 1.2.3.4, ports: {grpc: 9000}}]",
            "spec.endpoints[0].ports.grpc",
            "endpoint port 'grpc' is not defined by the service entry's ports",
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{address: 1.2.3.4, ports: {http: 0}}]\n"
            "ports: [{number: 80, name: http}]",
            "spec.endpoints[0].ports.http",
            "port number 0 must be in the range",
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{address: 1.2.3.4, labels: {app: 'x y'}}]",
            "spec.endpoints[0].labels.app",
            "invalid label value",
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{address: 'unix:///a.sock'}]",
            "spec.endpoints[0].address",
            "exactly 1 service port required for unix endpoints",
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nports: [{number: 80, name: http}]\n"
            "endpoints: [{address: 'unix://a.sock'}]",
            "spec.endpoints[0].address",
            "a.sock is not an absolute path to a file",
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nports: [{number: 80, name: http}]\n"
            "endpoints: [{address: 'unix:///a.sock', ports: {http: 80}}]",
            "spec.endpoints[0].ports",
            "unix endpoint unix:///a.sock must not include ports",
        ),
        (
            "hosts: [a.example.com]\nresolution: DNS\nendpoints: [{address: 'a_b.example.com'}]",
            "spec.endpoints[0].address",
            "endpoint address 'a_b.example.com' is not a valid FQDN or an IP address",
        ),
        (
            "hosts: [a.example.com]\nresolution: DNS\nendpoints: [{address: 'unix:///a.sock'}]",
            "spec.endpoints[0].address",
            "is a unix socket: resolution DNS needs an IP or a hostname",
        ),
        (
            "hosts: [a.example.com]\nresolution: DNS\nendpoints: [{network: n1}]",
            "spec.endpoints[0].address",
            "endpoint address is required for resolution DNS",
        ),
        (
            "hosts: [a.example.com]\nresolution: DNS\nports: [{number: 80, name: http}]\n"
            "endpoints: [{address: b.example.com, ports: {web: 8080}}]",
            "spec.endpoints[0].ports.web",
            "is not defined by the service entry's ports",
        ),
        (
            "hosts: [a.example.com]\nresolution: DNS_ROUND_ROBIN\nendpoints: [{address: 1.2.3.4}, {address: 1.2.3.5}]",
            "spec.endpoints",
            "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN",
        ),
        (
            "hosts: ['*.example.com']\nresolution: DNS",
            "spec.hosts[0]",
            "must be a fully qualified domain name (no wildcard) when resolution is DNS and no endpoints are given",
        ),
        (
            "hosts: [a.example.com, b.example.com]\nresolution: DNS\nports: [{number: 80, name: http, protocol: HTTP}, "
            "{number: 5432, name: tcp, protocol: TCP}]",
            "spec.ports[1].protocol",
            "multiple hosts provided with non-HTTP, non-TLS ports",
        ),
        (
            "hosts: [a.example.com, b.example.com]\nresolution: STATIC\nendpoints: [{address: 1.2.3.4}]\n"
            "ports: [{number: 80, name: http}]",
            "spec.ports[0].protocol",
            "multiple hosts provided with non-HTTP, non-TLS ports",
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nworkloadSelector: {labels: {app: 'a*'}}",
            "spec.workloadSelector.labels.app",
            "wildcard is not supported in selector",
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nworkloadSelector: {labels: {'': a}}",
            "spec.workloadSelector.labels",
            "empty key is not supported in selector",
        ),
        (
            f"hosts: [a.example.com]\nresolution: STATIC\nworkloadSelector: {{labels: {{app: {'v' * 64}}}}}",
            "spec.workloadSelector.labels.app",
            "label value may not exceed 63 characters",
        ),
        # DYNAMIC_DNS
        ("hosts: [a.example.com]\nresolution: DYNAMIC_DNS", "spec.hosts[0]", "host must be wildcarded"),
        (
            "hosts: ['*.example.com']\nresolution: DYNAMIC_DNS\nports: [{number: 5432, name: tcp, protocol: TCP}]",
            "spec.ports[0].protocol",
            "only HTTP, TLS, GRPC, and HTTP2 protocols are supported for resolution type DYNAMIC_DNS",
        ),
        (
            "hosts: ['*.example.com']\nresolution: DYNAMIC_DNS\naddresses: [1.2.3.4]",
            "spec.addresses",
            "addresses cannot be set for resolution type DYNAMIC_DNS",
        ),
        # exportTo
        ("hosts: [a.example.com]\nexportTo: ['.', foo]", "spec.exportTo[1]", ". and current namespace foo"),
        (
            "hosts: [a.example.com]\nexportTo: [bar, bar]",
            "spec.exportTo[1]",
            "duplicate entries in exportTo for entry bar",
        ),
        ("hosts: [a.example.com]\nexportTo: ['*', bar]", "spec.exportTo", "cannot have both public (*)"),
        ("hosts: [a.example.com]\nexportTo: ['~', bar]", "spec.exportTo", "cannot export service entry to no one (~)"),
        ("hosts: [a.example.com]\nexportTo: [Bar_ns]", "spec.exportTo[0]", "invalid entry 'Bar_ns'"),
    ],
)
def test_invalid_service_entries(tmp_path: Path, spec: str, field: str, message: str) -> None:
    write(tmp_path, "se.yaml", doc(SE_HEAD, spec))
    errs = errors_of(tmp_path)
    assert len(errs) == 1, errs
    [err] = errs
    assert err.startswith(f"{tmp_path / 'se.yaml'}: document 1 (ServiceEntry foo/ext), line "), err
    assert f"error: {field}: " in err and message in err, err


def test_dynamic_dns_mesh_internal_with_a_waypoint(tmp_path: Path) -> None:
    head = SE_HEAD.replace("namespace: foo}", "namespace: foo, labels: {istio.io/use-waypoint: wp}}")
    write(tmp_path, "se.yaml", doc(head, "hosts: ['*.example.com']\nresolution: DYNAMIC_DNS\nlocation: MESH_INTERNAL"))
    [err] = errors_of(tmp_path)
    assert "spec.location: location MESH_INTERNAL with resolution type DYNAMIC_DNS is not supported" in err
    write(
        tmp_path, "se.yaml", doc(SE_HEAD, "hosts: ['*.example.com']\nresolution: DYNAMIC_DNS\nlocation: MESH_INTERNAL")
    )
    assert loader.load([tmp_path]).service_entries[0].policy.spec.resolution is Resolution.DYNAMIC_DNS


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ("hosts: ['*foo.example.com']", "spec.hosts[0]", "partial wildcard '*foo.example.com' not allowed"),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nworkloadSelector: {}",
            "spec.workloadSelector",
            "workload selector specified without labels",
        ),
        (
            "hosts: [a.example.com]\nworkloadSelector: {labels: {app: a}}",
            "spec.workloadSelector",
            "workloadSelector should not be set when resolution mode is NONE",
        ),
        (
            "hosts: [a.example.com]\nports: [{number: 5432, name: tcp}]",
            "spec.ports[0].protocol",
            "addresses are required for ports serving TCP (or unset) protocol",
        ),
        (
            "hosts: [a.example.com, b.example.com]\naddresses: [1.2.3.4]\nresolution: DNS\n"
            "ports: [{number: 443, name: tls, protocol: TLS}]",
            "spec.ports[0]",
            "can not have more than one host specified simultaneously with address and tcp port",
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{network: n1}]",
            "spec.endpoints[0].address",
            "address is unset with network 'n1'",
        ),
    ],
)
def test_service_entry_warnings_do_not_block(tmp_path: Path, spec: str, field: str, message: str) -> None:
    write(tmp_path, "se.yaml", doc(SE_HEAD, spec))
    loaded = loader.load([tmp_path])
    assert len(loaded.service_entries) == 1
    [warning] = [w.render() for w in loaded.warnings]
    assert f"warning: {field}: " in warning and message in warning, warning


def test_tcp_without_addresses_is_fine_when_istio_allocates_one(tmp_path: Path) -> None:
    write(
        tmp_path, "se.yaml", doc(SE_HEAD, "hosts: [a.example.com]\nresolution: DNS\nports: [{number: 5432, name: tcp}]")
    )
    assert warnings_of(tmp_path) == []
    head = SE_HEAD.replace(
        "namespace: foo}", "namespace: foo, labels: {networking.istio.io/enable-autoallocate-ip: 'False'}}"
    )
    write(tmp_path, "se.yaml", doc(head, "hosts: [a.example.com]\nresolution: DNS\nports: [{number: 5432, name: tcp}]"))
    [warning] = warnings_of(tmp_path)
    assert "addresses are required for ports serving TCP" in warning


@pytest.mark.parametrize(
    "spec",
    [
        "hosts: ['*.example.com', short-name, trailing.dot.]\nports: [{number: 80, name: http, protocol: http}]",
        "hosts: [a.example.com]\naddresses: [10.0.0.0/8, '2001:db8::/32']\nresolution: STATIC\n"
        "ports: [{number: 80, name: http, protocol: grpc-web}]\nendpoints: [{address: 10.1.1.1}]",
        "hosts: [a.example.com]\nresolution: STATIC\nports: [{number: 80, name: http, protocol: HTTP}]\n"
        "endpoints: [{address: 'unix:///var/run/a.sock'}]",
        "hosts: [a.example.com, b.example.com]\nresolution: DNS\n"
        "ports: [{number: 443, name: https, protocol: HTTPS}, {number: 80, name: http, protocol: HTTP2}]",
        "hosts: ['*.example.com']\nresolution: DNS\nports: [{number: 443, name: tls, protocol: TLS}]\n"
        "endpoints: [{address: egress.example.com, ports: {tls: 8443}}]",
        "hosts: [a.example.com]\nexportTo: ['~']",
        "hosts: [a.example.com]\nexportTo: ['*']",
        "hosts: [a.example.com]\nports: [{number: 27017, name: mongo, protocol: MONGO}, {number: 6379, name: redis, "
        "protocol: Redis}, {number: 3306, name: mysql, protocol: mysql}, {number: 53, name: dns, protocol: UDP}]\n"
        "addresses: [1.2.3.4]",
    ],
)
def test_valid_service_entries(tmp_path: Path, spec: str) -> None:
    write(tmp_path, "se.yaml", doc(SE_HEAD, spec))
    loaded = loader.load([tmp_path])
    assert len(loaded.service_entries) == 1 and loaded.warnings == [], [w.render() for w in loaded.warnings]
