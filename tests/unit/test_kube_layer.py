"""The Kubernetes half of the engine against the stand-in API: server-side apply, no-ops, CRD waits, pruning."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from homelab import inventory, pipeline
from homelab.context import Run, Timeouts
from homelab.lab.k3s_standin import serve
from homelab.layers.kubernetes import ManifestLayer
from homelab.target import ProxmoxAccess, Secret, Target
from homelab.wait import Progress

TOKEN = "kube-layer-test-token-5d1e"


@dataclass
class Rendered:
    objects: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "homelab", "homelab.jigga.xyz/component": component}


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.jigga.xyz", "labels": labels("widgets")},
    "spec": {"group": "example.jigga.xyz", "scope": "Namespaced",
             "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "properties": {"spec": {"type": "object", "properties": {
                     "size": {"type": "integer"}}}}}}}]},
}


def objects(size: int = 3, extra: bool = True) -> dict[str, list[dict[str, Any]]]:
    base = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": labels("base")}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "demo",
                                                              "labels": labels("base")}, "data": {"a": "1"}},
    ]
    if extra:
        base.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "extra", "namespace": "demo", "labels": labels("base")}, "data": {"b": "2"}})
    widgets = [CRD, {"apiVersion": "example.jigga.xyz/v1", "kind": "Widget",
                     "metadata": {"name": "w1", "namespace": "demo", "labels": labels("widgets")},
                     "spec": {"size": size}}]
    return {"base": base, "widgets": widgets}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Path]:
    handle = serve({"data-dir": str(tmp_path / "data"), "https-listen-port": 0, "bind-address": "127.0.0.1",
                    "node-ip": "127.0.0.1", "node-name": "ichigo", "token": TOKEN,
                    "write-kubeconfig": str(tmp_path / "k3s.yaml")}, log_stream=io.StringIO())
    doc = yaml.safe_load(Path(handle.kubeconfig).read_text())
    for section in ("clusters", "users", "contexts"):
        doc[section][0]["name"] = "homelab"
    doc["contexts"][0]["context"] = {"cluster": "homelab", "user": "homelab"}
    doc["current-context"] = "homelab"
    operator = tmp_path / "operator"
    operator.mkdir(mode=0o700)
    (operator / "kubeconfig").write_text(yaml.safe_dump(doc))
    try:
        yield operator
    finally:
        handle.stop()


def make_run(operator: Path) -> Run:
    target = Target("lab", ProxmoxAccess("root@pam!x", Secret("unused"), True, ("127.0.0.1", 1)),
                    ssh_public_key=operator / "none.pub", state_dir=operator)
    out = Console(file=io.StringIO(), width=200)
    return Run(inventory.load(), target, out, Progress(out), Timeouts(k3s=20))


def layer(state: dict[str, list[dict[str, Any]]]) -> ManifestLayer:
    return ManifestLayer("demo", ("base", "widgets"), lambda run, component: Rendered(state[component]))


def run_up(operator: Path, state: dict[str, list[dict[str, Any]]], dry_run: bool = False) -> tuple[Any, Run]:
    run = make_run(operator)
    outcome = pipeline.execute(run, "up", ["demo"], dry_run=dry_run, registry={"demo": layer(state)})
    run.close()
    return outcome, run


def actions(outcome: Any) -> list[tuple[str, str, str]]:
    return [(c.kind, c.name, c.action) for p in outcome.plans for c in p.changes if c.action != "noop"]


def test_converges_waits_for_the_crd_and_changes_nothing_the_second_time(cluster: Path) -> None:
    outcome, run = run_up(cluster, objects())
    assert not outcome.failed, run.console.file.getvalue()  # type: ignore[attr-defined]
    assert ("Widget", "demo/w1", "create") in actions(outcome)
    outcome, run = run_up(cluster, objects())
    assert actions(outcome) == []
    writes = run.kube_requests()
    # One list per kind (4 kinds), nothing per object.
    assert writes <= 4 + 3, writes


def test_a_changed_field_is_one_update_and_a_dropped_object_is_pruned(cluster: Path) -> None:
    run_up(cluster, objects())
    outcome, run = run_up(cluster, objects(size=5, extra=False))
    assert not outcome.failed, run.console.file.getvalue()  # type: ignore[attr-defined]
    assert sorted(actions(outcome)) == [("ConfigMap", "demo/extra", "delete"), ("Widget", "demo/w1", "update")]
    update = next(c for p in outcome.plans for c in p.changes if c.kind == "Widget")
    assert [(f.name, f.old, f.new) for f in update.fields] == [("spec.size", 3, 5)]
    outcome, _ = run_up(cluster, objects(size=5, extra=False))
    assert actions(outcome) == []


def test_dry_run_writes_nothing_and_down_removes_everything(cluster: Path) -> None:
    outcome, _ = run_up(cluster, objects(), dry_run=True)
    assert ("Namespace", "demo", "create") in actions(outcome)
    outcome, _ = run_up(cluster, objects(), dry_run=True)
    assert ("Namespace", "demo", "create") in actions(outcome)  # still absent
    run_up(cluster, objects())
    run = make_run(cluster)
    outcome = pipeline.execute(run, "down", ["demo"], dry_run=False, registry={"demo": layer(objects())})
    assert not outcome.failed
    assert {a for _, _, a in actions(outcome)} == {"delete"}
    outcome, _ = run_up(cluster, objects(), dry_run=True)
    assert ("ConfigMap", "demo/settings", "create") in actions(outcome)


def test_secret_values_never_reach_the_plan(cluster: Path) -> None:
    secret_value = "c3VwZXItc2VjcmV0LXRva2Vu"  # base64 of a made-up token
    state = objects()
    state["base"].append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                          "metadata": {"name": "api-token", "namespace": "demo", "labels": labels("base")},
                          "data": {"api-token": secret_value}})
    outcome, run = run_up(cluster, state, dry_run=True)
    text = run.console.file.getvalue()  # type: ignore[attr-defined]
    change = next(c for p in outcome.plans for c in p.changes if c.kind == "Secret")
    assert secret_value not in text and secret_value not in str(change.as_json())
    assert any(f.new == "(secret)" for f in change.fields)
