"""Load every resource from the config directories, or reject the whole set.

A change is all-or-nothing: if any document has an error the caller gets a
ConfigError listing every problem (file, document, resource, field, line) and keeps
whatever it was running before. Warnings never block a load. An extension provider
with invalid settings is a warning, not an error, as it is in istiod: the CUSTOM
rules naming it deny what they match and everything else is served.

Recognised documents:
  * AuthorizationPolicy            security.istio.io/v1 or v1beta1
  * RequestAuthentication          security.istio.io/v1 or v1beta1
  * WorkloadEntry                  networking.istio.io/v1, v1beta1 or v1alpha3
  * ServiceEntry                   networking.istio.io/v1, v1beta1 or v1alpha3
  * MeshConfig                     extproc.io/v1alpha1: `spec.extensionProviders` as in Istio
  * ConfigMap named `istio`        Istio's own mesh ConfigMap; `data.mesh` is read for
                                   `extensionProviders`, other mesh settings are ignored
  * Telemetry                      telemetry.istio.io/v1 or v1alpha1: `spec.metrics`
  * List                           `items` are loaded as documents of their own
Anything else (other networking.istio.io kinds such as VirtualService or DestinationRule
included) is skipped with a warning, so a directory shared with other manifests loads.

A reload passes a `FileMemory`: a file written in place may be caught mid-write
(`cmd > policy.yaml` truncates it before writing), so what it held stays in force until
the file has stayed unchanged for `FileMemory.settle_s`, with a warning if it is empty or
invalid meanwhile. Only then is it read as it is: an emptied file removes its resources,
an invalid one rejects the change as any error does.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from extproc.config import validation
from extproc.config.errors import ConfigError, ConfigIssue, Location, format_path, pydantic_issues
from extproc.config.models import (
    EXTPROC_API_VERSION,
    NETWORKING_API_VERSIONS,
    SECURITY_API_VERSIONS,
    AuthorizationPolicy,
    MeshConfig,
    MeshConfigSpec,
    RequestAuthentication,
    ServiceEntry,
    WorkloadEntry,
)
from extproc.config.providers import InvalidProvider, ProviderSettings, resolve_providers
from extproc.config.yamlsource import Document, YAMLSyntaxError, load_documents
from extproc.telemetry.resource import LoadedTelemetry, is_telemetry, parse_telemetry


@dataclass(frozen=True, slots=True)
class _Kind:
    """An Istio kind read into a model, validated, and kept in a list of LoadedConfig."""

    versions: tuple[str, ...]  # the supported apiVersions, all of one group
    model: type[BaseModel]
    validate: Callable[[Any], list[validation.Problem]]
    field: str  # the LoadedConfig list it goes to

    @property
    def group(self) -> str:
        return self.versions[0].split("/", 1)[0] + "/"


_ISTIO_KINDS: dict[str, _Kind] = {
    "AuthorizationPolicy": _Kind(
        SECURITY_API_VERSIONS, AuthorizationPolicy, validation.validate_authorization_policy, "policies"
    ),
    "RequestAuthentication": _Kind(
        SECURITY_API_VERSIONS,
        RequestAuthentication,
        validation.validate_request_authentication,
        "request_authentications",
    ),
    "WorkloadEntry": _Kind(
        NETWORKING_API_VERSIONS, WorkloadEntry, validation.validate_workload_entry, "workload_entries"
    ),
    "ServiceEntry": _Kind(NETWORKING_API_VERSIONS, ServiceEntry, validation.validate_service_entry, "service_entries"),
}

YAML_SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 16 * 1024 * 1024
SETTLE_S = 2.0  # how long a suspect file must stay unchanged before it is believed

Signature = tuple[int, int, int]  # inode, size, mtime_ns: a rewrite or an append changes one of them


def digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@dataclass
class FileMemory:
    """What reloads remember of each file, so that a file caught mid-write keeps its resources.

    A file rewritten in place (`cmd > policy.yaml` truncates it, then writes it in as many
    pieces as `cmd` likes) passes through states that may be empty, invalid, or valid but
    cut short: a DENY that lost its last paths, an ALLOW rule that lost its `when`. None of
    them can be told from the finished file by looking at it, so a file changed in place,
    or a new file, is believed only once it is *stable*: two loads at least `settle_s`
    apart saw the same inode, size and mtime. Until then the content last served from
    that path stays in force (none, for a new file). The holder schedules the second load
    itself, so an edit, including emptying a file on purpose, takes effect about
    `settle_s` after its last write with no further change.

    A file replaced atomically (a new inode at a path already loaded: `mv`, `sed -i`, a
    Kubernetes ConfigMap update) is complete by construction and believed at once, as is
    every file at the first load. Each file in force is kept open (`pins`), so its inode
    cannot be freed and its number handed to the replacement, which would make an atomic
    replacement look like a write in place. Stability is judged by observation rather than by the
    file's timestamps, which a network file system or a restored backup may get wrong.

    A load stages what it read; the holder commits it only when the whole change was
    served, so the "last good content" is always content that was actually in force.
    """

    settle_s: float = SETTLE_S  # 0 believes every file at once
    clock: Callable[[], float] = time.monotonic
    loaded: bool = False  # a first load has been committed
    good: dict[str, str] = field(default_factory=dict)  # file -> text in force, if it had documents
    sigs: dict[str, Signature] = field(default_factory=dict)  # file -> signature of the content in force
    read_digests: dict[str, str] = field(default_factory=dict)  # file -> digest of the bytes in force
    suspect: dict[str, tuple[Signature, float]] = field(default_factory=dict)  # file -> (signature, first seen)
    # Staged by the load in progress:
    staged: dict[str, str] = field(default_factory=dict)
    staged_sigs: dict[str, Signature] = field(default_factory=dict)
    staged_digests: dict[str, str] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)
    pins: dict[str, int] = field(default_factory=dict)  # file -> open descriptor of the content in force
    staged_pins: dict[str, int] = field(default_factory=dict)

    def begin(self) -> None:
        self.discard()
        self.staged, self.staged_sigs, self.staged_digests, self.held = {}, {}, {}, []

    def discard(self) -> None:
        """The staged load was not served: let go of what it opened."""
        _close(set(self.staged_pins.values()) - set(self.pins.values()))
        self.staged_pins = {}

    def believe(self, file: str, sig: Signature, text: str) -> bool:
        """Whether to use what was just read from `file`, or keep what is in force."""
        if self.settle_s <= 0 or not self.loaded:
            return True
        before = self.sigs.get(file)
        if before == sig or self.read_digests.get(file) == digest(text):
            return True  # unchanged, or touched
        if before is not None and before[0] != sig[0]:
            return True  # a new inode at a known path: replaced atomically
        now = self.clock()
        seen = self.suspect.get(file)
        if seen is None or seen[0] != sig:
            self.suspect[file] = (sig, now)
            return False
        return now - seen[1] >= self.settle_s

    def unchanged(self) -> bool:
        """The staged load serves exactly what is in force (every change is still settling)."""
        return self.staged == self.good

    def commit(self) -> None:
        """The staged load was served: its files are the content in force from now on."""
        self.loaded = True
        self.good = dict(self.staged)
        self.sigs = dict(self.staged_sigs)
        self.read_digests = dict(self.staged_digests)
        self.suspect = {f: v for f, v in self.suspect.items() if f in self.held}
        _close(set(self.pins.values()) - set(self.staged_pins.values()))
        self.pins, self.staged_pins = self.staged_pins, {}


def _close(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """An Istio resource (AuthorizationPolicy, RequestAuthentication, WorkloadEntry or
    ServiceEntry: its model is `policy`), with where it was defined."""

    policy: Any
    location: Location

    @property
    def origin(self) -> str:
        return self.location.render()


@dataclass
class LoadedConfig:
    policies: list[LoadedPolicy] = field(default_factory=list)
    providers: dict[str, ProviderSettings] = field(default_factory=dict)
    # ext_authz providers istiod would keep as unusable (their CUSTOM rules deny what they match).
    invalid_providers: dict[str, InvalidProvider] = field(default_factory=dict)
    mesh_origin: str | None = None
    files: list[str] = field(default_factory=list)
    warnings: list[ConfigIssue] = field(default_factory=list)
    request_authentications: list[LoadedPolicy] = field(default_factory=list)
    telemetries: list[LoadedTelemetry] = field(default_factory=list)
    workload_entries: list[LoadedPolicy] = field(default_factory=list)
    service_entries: list[LoadedPolicy] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # files written in place, not yet settled: not read


def config_files(dirs: Sequence[str | os.PathLike[str]]) -> list[FsPath]:
    """YAML files under the directories, recursively, skipping hidden entries.

    Hidden entries are skipped because a Kubernetes ConfigMap volume keeps its data
    in `..data`/`..2024_...` directories behind symlinks; the visible names are what
    the user wrote.
    """
    out: list[FsPath] = []
    for d in dirs:
        root = FsPath(d)
        if not root.is_dir():
            raise ConfigError(
                [ConfigIssue(Location(str(root), 0), "", "config directory does not exist or is not a directory")]
            )
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for name in sorted(filenames):
                if not name.startswith(".") and name.endswith(YAML_SUFFIXES):
                    out.append(FsPath(dirpath) / name)
    return out


def _resource_label(kind: str, data: dict[str, Any]) -> str:
    md = data.get("metadata")
    if isinstance(md, dict) and isinstance(md.get("name"), str):
        ns = md.get("namespace")
        return f"{kind} {ns}/{md['name']}" if isinstance(ns, str) else f"{kind} {md['name']}"
    return kind


def _validate_model(model: type[BaseModel], data: Any, doc: Document, file: str, resource: str | None) -> Any:
    try:
        return model.model_validate(data), []
    except ValidationError as e:
        return None, pydantic_issues(e, doc, file, resource)


def _expand(doc: Document) -> Iterator[tuple[Document, tuple[str | int, ...]]]:
    """Yield the document itself or, for a `List`, each item with its path prefix."""
    data = doc.data
    if isinstance(data, dict) and data.get("kind") == "List" and isinstance(data.get("items"), list):
        for i, item in enumerate(data["items"]):
            prefix = ("items", i)
            lines = {k[2:]: v for k, v in doc.lines.items() if k[:2] == prefix}
            yield Document(doc.index, item, lines, doc.lines.get(prefix, doc.start_line)), prefix
    else:
        yield doc, ()


def _read(path: FsPath) -> tuple[str, Signature, int]:
    """The text, its signature and an open descriptor: what was read is what was signed."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_size > MAX_FILE_BYTES:
            raise _TooLarge
        with open(fd, "rb", closefd=False) as f:
            text = f.read(MAX_FILE_BYTES + 1).decode("utf-8")
    except BaseException:
        os.close(fd)
        raise
    return text, (st.st_ino, st.st_size, st.st_mtime_ns), fd


class _TooLarge(Exception):
    pass


def _parse(text: str, file: str) -> tuple[list[Document], ConfigIssue | None]:
    try:
        return list(load_documents(text)), None
    except YAMLSyntaxError as e:
        return [], ConfigIssue(Location(file, e.document, e.line), "", f"invalid YAML: {e.message}")


def load(dirs: Sequence[str | os.PathLike[str]], memory: FileMemory | None = None) -> LoadedConfig:
    """Load and validate every document; raise ConfigError listing all errors.

    With `memory` (reloads), a file written in place is believed once it has settled;
    until then what it held stays in force (see FileMemory).
    """
    result = LoadedConfig()
    if memory is not None:
        memory.begin()
    issues: list[ConfigIssue] = []
    seen: dict[tuple[str, str, str], Location] = {}
    mesh_specs: list[tuple[MeshConfigSpec, Document, str, tuple[str | int, ...]]] = []

    for path in config_files(dirs):
        file = str(path)
        result.files.append(file)
        try:
            text, sig, fd = _read(path)
        except _TooLarge:
            issues.append(ConfigIssue(Location(file, 0), "", f"file is larger than {MAX_FILE_BYTES} bytes"))
            continue
        except (OSError, UnicodeDecodeError) as e:
            issues.append(ConfigIssue(Location(file, 0), "", f"cannot read file: {e}"))
            continue
        docs, syntax = _parse(text, file)
        if memory is None:
            os.close(fd)
        else:
            if memory.believe(file, sig, text):
                memory.staged_pins[file] = fd
                memory.suspect.pop(file, None)
                if not docs and syntax is None and file in memory.good:
                    issues.append(
                        ConfigIssue(Location(file, 0), "", "the file is empty: the resources it held are removed", True)
                    )
            else:
                os.close(fd)
                memory.held.append(file)
                result.held.append(file)
                if syntax is not None or not docs:
                    what = "not valid YAML" if syntax is not None else "empty"
                    issues.append(
                        ConfigIssue(
                            Location(file, 0),
                            "",
                            f"the file is {what}, as when caught mid-write; what it held stays in force until "
                            f"it is unchanged for {memory.settle_s:g}s",
                            warning=True,
                        )
                    )
                kept = memory.good.get(file)
                if kept is None:  # a new file, or one that held nothing: it stays absent for now
                    continue
                text, sig = kept, memory.sigs[file]
                if file in memory.pins:
                    memory.staged_pins[file] = memory.pins[file]
                docs, syntax = _parse(text, file)
            memory.staged_sigs[file] = sig
            memory.staged_digests[file] = digest(text)
            if docs:
                memory.staged[file] = text
        if syntax is not None:
            issues.append(syntax)
            continue
        for top in docs:
            for doc, prefix in _expand(top):
                _load_document(doc, prefix, file, result, issues, seen, mesh_specs)

    if len(mesh_specs) > 1:
        for _, doc, file, prefix in mesh_specs[1:]:
            first = mesh_specs[0]
            issues.append(
                ConfigIssue(
                    Location(file, doc.index, doc.line_of(prefix)),
                    "",
                    f"a second mesh config; the first is in {first[2]} document {first[1].index}",
                )
            )
    elif mesh_specs:
        spec, doc, file, base = mesh_specs[0]
        resolved = resolve_providers(spec.extension_providers, (*base, "extensionProviders"))
        for p, msg in resolved.errors:
            issues.append(ConfigIssue(Location(file, doc.index, doc.line_of(p)), format_path(p), msg))
        for bad in resolved.invalid.values():
            for p, msg in bad.issues:
                issues.append(
                    ConfigIssue(
                        Location(file, doc.index, doc.line_of(p)),
                        format_path(p),
                        f"{msg}; extension provider {bad.name!r} is unusable: as in istiod, the CUSTOM rules "
                        "naming it deny the requests they match",
                        warning=True,
                    )
                )
        result.providers = resolved.settings
        result.invalid_providers = resolved.invalid
        result.mesh_origin = f"{file}: document {doc.index}"

    errors = [i for i in issues if not i.warning]
    result.warnings.extend(i for i in issues if i.warning)
    if errors:
        raise ConfigError(issues)
    return result


def _load_document(
    doc: Document,
    prefix: tuple[str | int, ...],
    file: str,
    result: LoadedConfig,
    issues: list[ConfigIssue],
    seen: dict[tuple[str, str, str], Location],
    mesh_specs: list[tuple[MeshConfigSpec, Document, str, tuple[str | int, ...]]],
) -> None:
    data = doc.data
    where = Location(file, doc.index, doc.line_of(()))

    def at(path: tuple[str | int, ...]) -> str:
        return format_path((*prefix, *path))

    if not isinstance(data, dict):
        issues.append(ConfigIssue(where, at(()), "a resource must be a mapping with apiVersion and kind"))
        return
    kind, api = data.get("kind"), data.get("apiVersion")
    if not isinstance(kind, str) or not isinstance(api, str):
        issues.append(ConfigIssue(where, at(()), "a resource needs string `apiVersion` and `kind` fields"))
        return
    label = _resource_label(kind, data)
    where = Location(file, doc.index, doc.line_of(()), label)

    istio_kind = _ISTIO_KINDS.get(kind)
    if istio_kind is not None and api.startswith(istio_kind.group):
        if api not in istio_kind.versions:
            issues.append(
                ConfigIssue(
                    Location(file, doc.index, doc.line_of(("apiVersion",)), label),
                    at(("apiVersion",)),
                    f"unsupported version {api}; use one of {', '.join(istio_kind.versions)}",
                )
            )
            return
        resource, errs = _validate_model(istio_kind.model, data, doc, file, label)
        if errs:
            issues.extend(_prefixed(errs, prefix))
            return
        if not resource.metadata.namespace:
            issues.append(
                ConfigIssue(
                    Location(file, doc.index, doc.line_of(("metadata",)), label),
                    at(("metadata", "namespace")),
                    "required: extproc has no kubectl context to default the namespace from",
                )
            )
            return
        problems = [
            ConfigIssue(
                Location(file, doc.index, doc.line_of(prob.path), label), at(prob.path), prob.message, prob.warning
            )
            for prob in istio_kind.validate(resource)
        ]
        issues.extend(problems)
        if any(not p.warning for p in problems):
            return
        key = (kind, resource.metadata.namespace, resource.metadata.name)
        if key in seen:
            issues.append(
                ConfigIssue(
                    where,
                    at(("metadata", "name")),
                    f"duplicate {kind}, first defined in {seen[key].render()}",
                )
            )
            return
        seen[key] = where
        getattr(result, istio_kind.field).append(LoadedPolicy(resource, where))
        return

    if is_telemetry(data):
        telemetry, problems = parse_telemetry(doc, file, prefix)
        issues.extend(problems)
        if telemetry is None:
            return
        key = (kind, telemetry.namespace, telemetry.name)
        if key in seen:
            issues.append(
                ConfigIssue(
                    telemetry.location,
                    at(("metadata", "name")),
                    f"duplicate {kind}, first defined in {seen[key].render()}",
                )
            )
            return
        seen[key] = telemetry.location
        result.telemetries.append(telemetry)
        return

    if kind == "MeshConfig" and api == EXTPROC_API_VERSION:
        mesh, errs = _validate_model(MeshConfig, data, doc, file, label)
        if errs:
            issues.extend(_prefixed(errs, prefix))
            return
        mesh_specs.append((mesh.spec, doc, file, (*prefix, "spec")))
        return

    if kind == "ConfigMap" and api == "v1" and isinstance(data.get("metadata"), dict):
        if data["metadata"].get("name") != "istio":
            issues.append(ConfigIssue(where, at(()), "ignored: only the ConfigMap named `istio` is read", warning=True))
            return
        mesh_text = (data.get("data") or {}).get("mesh")
        if not isinstance(mesh_text, str):
            issues.append(ConfigIssue(where, at(("data", "mesh")), "the istio ConfigMap needs a `data.mesh` string"))
            return
        try:
            mesh_data = yaml.safe_load(mesh_text) or {}
        except yaml.YAMLError as e:
            issues.append(ConfigIssue(where, at(("data", "mesh")), f"invalid YAML in data.mesh: {e}"))
            return
        if not isinstance(mesh_data, dict):
            issues.append(ConfigIssue(where, at(("data", "mesh")), "data.mesh must be a YAML mapping"))
            return
        sub = Document(doc.index, {"extensionProviders": mesh_data.get("extensionProviders") or []})
        sub.start_line = doc.line_of(("data", "mesh")) or doc.start_line
        try:
            spec = MeshConfigSpec.model_validate(sub.data)
        except ValidationError as e:
            issues.extend(_prefixed(pydantic_issues(e, sub, file, label), (*prefix, "data", "mesh")))
            return
        mesh_specs.append((spec, sub, file, (*prefix, "data", "mesh")))
        return

    issues.append(ConfigIssue(where, at(()), f"ignored: {api} {kind} is not used by extproc", warning=True))


def _prefixed(issues: Iterable[ConfigIssue], prefix: tuple[str | int, ...]) -> list[ConfigIssue]:
    if not prefix:
        return list(issues)
    pre = format_path(prefix)
    return [
        ConfigIssue(
            i.location,
            f"{pre}.{i.field}" if i.field and not i.field.startswith("[") else pre + i.field,
            i.message,
            i.warning,
        )
        for i in issues
    ]
