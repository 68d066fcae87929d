"""`extproc validate` and `extproc explain` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.cli import main

POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reads, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - to: [{operation: {methods: ["GET"]}}]
"""


def test_validate_ok_and_which_policies_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    assert main(["validate", "--config-dir", str(tmp_path)]) == 0
    assert "ok: 1 AuthorizationPolicies and 0 RequestAuthentications in 1 files" in capsys.readouterr().out
    assert main(["validate", "--config-dir", str(tmp_path), "--namespace", "foo", "--labels", "app=api"]) == 0
    assert "ignored: foo/reads: selector app=web does not match" in capsys.readouterr().out


def test_validate_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.yaml").write_text(POLICY.replace('"GET"', "7"))
    assert main(["validate", "--config-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        "p.yaml: document 1 (AuthorizationPolicy foo/reads), line 8: error: spec.rules[0].to[0].operation.methods[0]: must be a string"
        in err
    )


def test_explain_shows_each_rule_and_the_decision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "p.yaml").write_text(POLICY)
    args = ["explain", "--config-dir", str(cfg), "--namespace", "foo", "--labels", "app=web", "--request"]
    assert main([*args, json.dumps({"method": "GET", "path": "/x"})]) == 0
    assert "MATCH ALLOW" in capsys.readouterr().out
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"method": "POST", "path": "/x"}))
    assert main([*args, f"@{request}"]) == 3
    out = capsys.readouterr().out
    assert "to[0].operation.methods did not match" in out and "decision: DENIED" in out
