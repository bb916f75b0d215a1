"""The monitoring layer: Prometheus, Alertmanager, Grafana and Loki."""

from tasks._layer import collection

ns = collection("monitoring", "Prometheus, Alertmanager, Grafana and Loki")
