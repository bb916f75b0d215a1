"""The helm.cattle.io CRDs (HelmChart, HelmChartConfig) that K3s registers at server start.

Their schemas follow k3s-io/helm-controller's (v0.16): the same fields and types, without descriptions.
"""

from __future__ import annotations

from typing import Any

_STR: dict[str, Any] = {"type": "string"}
_INT_OR_STRING: dict[str, Any] = {"x-kubernetes-int-or-string": True}
_SECRETS: dict[str, Any] = {"type": "array", "items": {"type": "object", "properties": {
    "name": _STR, "keys": {"type": "array", "items": _STR}, "ignoreUpdates": {"type": "boolean"}}}}
_FREE: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
_LOCAL_REF: dict[str, Any] = {"type": "object", "properties": {"name": _STR}, "x-kubernetes-map-type": "atomic"}

HELMCHART_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "apiVersion": _STR, "kind": _STR, "metadata": {"type": "object"},
    "spec": {"type": "object", "properties": {
        "authPassCredentials": {"type": "boolean"}, "authSecret": _LOCAL_REF, "backOffLimit": {"type": "integer",
                                                                                              "format": "int32"},
        "bootstrap": {"type": "boolean"}, "chart": _STR, "chartContent": _STR, "createNamespace": {"type": "boolean"},
        "dockerRegistrySecret": _LOCAL_REF, "failurePolicy": {"type": "string", "enum": ["abort", "reinstall"],
                                                              "default": "reinstall"},
        "helmVersion": _STR, "insecureSkipTLSVerify": {"type": "boolean"}, "jobImage": _STR,
        "plainHTTP": {"type": "boolean"}, "podSecurityContext": _FREE, "repo": _STR, "repoCA": _STR,
        "repoCAConfigMap": _LOCAL_REF, "securityContext": _FREE,
        "set": {"type": "object", "additionalProperties": _INT_OR_STRING},
        "takeOwnership": {"type": "boolean"}, "targetNamespace": _STR, "timeout": _STR, "valuesContent": _STR,
        "valuesSecrets": _SECRETS, "version": _STR}},
    "status": {"type": "object", "properties": {
        "conditions": {"type": "array", "items": {"type": "object", "properties": {
            "message": _STR, "reason": _STR, "status": _STR, "type": _STR}}},
        "jobName": _STR}}}}

HELMCHARTCONFIG_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "apiVersion": _STR, "kind": _STR, "metadata": {"type": "object"},
    "spec": {"type": "object", "properties": {
        "failurePolicy": {"type": "string", "enum": ["abort", "reinstall"], "default": "reinstall"},
        "valuesContent": _STR, "valuesSecrets": _SECRETS}}}}


def helm_crds() -> list[dict[str, Any]]:
    def crd(plural: str, kind: str, schema: dict[str, Any], columns: list[dict[str, Any]],
            status: bool) -> dict[str, Any]:
        version: dict[str, Any] = {"name": "v1", "served": True, "storage": True,
                                   "schema": {"openAPIV3Schema": schema}, "additionalPrinterColumns": columns}
        if status:
            version["subresources"] = {"status": {}}
        return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{plural}.helm.cattle.io",
                             "labels": {"objectset.rio.cattle.io/owner-name": "k3s"}},
                "spec": {"group": "helm.cattle.io", "scope": "Namespaced",
                         "names": {"plural": plural, "singular": kind.lower(), "kind": kind,
                                   "listKind": f"{kind}List"},
                         "versions": [version]}}

    return [
        crd("helmcharts", "HelmChart", HELMCHART_SCHEMA, [
            {"name": "Job", "type": "string", "jsonPath": ".status.jobName"},
            {"name": "Chart", "type": "string", "jsonPath": ".spec.chart"},
            {"name": "TargetNamespace", "type": "string", "jsonPath": ".spec.targetNamespace"},
            {"name": "Version", "type": "string", "jsonPath": ".spec.version"},
            {"name": "Repo", "type": "string", "jsonPath": ".spec.repo"},
            {"name": "HelmVersion", "type": "string", "jsonPath": ".spec.helmVersion"},
            {"name": "Bootstrap", "type": "string", "jsonPath": ".spec.bootstrap"}], True),
        crd("helmchartconfigs", "HelmChartConfig", HELMCHARTCONFIG_SCHEMA, [], False),
    ]
