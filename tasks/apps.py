"""The apps layer: Vaultwarden, Homepage, Vault and ArgoCD."""

from tasks._layer import collection

ns = collection("apps", "Vaultwarden, Homepage, Vault and ArgoCD")
