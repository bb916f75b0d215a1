"""The k3s layer: K3s server and agents over SSH, the shared token and the kubeconfig."""

from tasks._layer import collection

ns = collection(
    "k3s",
    "K3s server and agents over SSH, the shared token and the kubeconfig",
)
