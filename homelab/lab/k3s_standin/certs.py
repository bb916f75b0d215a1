"""cert-manager.io/v1 Certificates, issued by one CA of the stand-in per issuer name (a lab "ACME").

The CA of issuer N has the subject CN `N (homelab lab ACME)`, or `(STAGING) N (homelab lab ACME)` when
the Issuer/ClusterIssuer's spec.acme.server contains "staging". CAs live in
<data-dir>/server/tls/standin-acme/<N>.{crt,key}; `GET /standin/acme-roots` (no auth) answers
{issuer name: CA PEM}.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from . import pki
from .api import Response, json_response, rfc3339

if TYPE_CHECKING:
    from .controllers import Controllers

JSONObj = dict[str, Any]
DEFAULT_DURATION = datetime.timedelta(days=90)
MANAGER = "cert-manager-certificates-issuing"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def parse_duration(text: Any) -> datetime.timedelta | None:
    """A Go duration such as 2160h or 1h30m."""
    if not isinstance(text, str) or not text:
        return None
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return datetime.timedelta(seconds=sum(float(n) * scale[u] for n, u in parts))


def _stamp(when: datetime.datetime) -> str:
    return rfc3339(when.timestamp())


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class CertificateController:
    def __init__(self, ctl: Controllers, ca_dir: Path) -> None:
        self.ctl, self.ca_dir = ctl, ca_dir
        self._lock = threading.Lock()
        self._cas: dict[str, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = {}

    # --- the per-issuer CAs
    def _ca(self, issuer: str, staging: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cn = f"{'(STAGING) ' if staging else ''}{issuer} (homelab lab ACME)"
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", issuer)
        cert_path, key_path = self.ca_dir / f"{safe}.crt", self.ca_dir / f"{safe}.key"
        with self._lock:
            cached = self._cas.get(issuer)
            if cached is None and cert_path.exists() and key_path.exists():
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                if isinstance(key, ec.EllipticCurvePrivateKey):
                    cached = (x509.load_pem_x509_certificate(cert_path.read_bytes()), key)
            if cached is not None:
                names = cached[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                if names and names[0].value == cn:
                    self._cas[issuer] = cached
                    return cached
            key = ec.generate_private_key(ec.SECP256R1())
            now = datetime.datetime.now(datetime.UTC)
            name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "homelab lab"),
                              x509.NameAttribute(NameOID.COMMON_NAME, cn)])
            cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(minutes=5))
                    .not_valid_after(now + datetime.timedelta(days=3650))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                 content_commitment=False, key_encipherment=False,
                                                 data_encipherment=False, key_agreement=False, encipher_only=False,
                                                 decipher_only=False), critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                    .sign(key, hashes.SHA256()))
            self.ca_dir.mkdir(parents=True, exist_ok=True)
            pki.write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                                          serialization.NoEncryption()))
            pki.write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            (self.ca_dir / f"{safe}.issuer").write_text(issuer, encoding="utf-8")
            self._cas[issuer] = (cert, key)
            self.ctl.log.info(f"cert-manager (stand-in): new CA {cn!r} for issuer {issuer}")
            return cert, key

    def roots(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if not self.ca_dir.exists():
            return out
        with self._lock:
            for crt in sorted(self.ca_dir.glob("*.crt")):
                marker = crt.with_suffix(".issuer")
                issuer = marker.read_text(encoding="utf-8") if marker.exists() else crt.stem
                out[issuer] = crt.read_text(encoding="utf-8")
        return out

    def roots_response(self) -> Response:
        return json_response(200, self.roots())

    # --- reconcile
    def reconcile(self) -> None:
        cert_rt = self.ctl.rt("cert-manager.io", "v1", "certificates")
        if cert_rt is None:
            return
        for cert in self.ctl.store.list_objects(cert_rt.storage_key):
            if not cert["metadata"].get("deletionTimestamp"):
                self._one(cert_rt, cert)

    def _issuer(self, cert: JSONObj) -> tuple[str, str, bool, str]:
        """(name, kind, staging, why not ready)."""
        ref = (cert.get("spec") or {}).get("issuerRef") or {}
        name, kind = str(ref.get("name") or ""), str(ref.get("kind") or "Issuer")
        group = str(ref.get("group") or "cert-manager.io")
        if not name:
            return name, kind, False, "spec.issuerRef.name is not set"
        if group != "cert-manager.io" or kind not in ("Issuer", "ClusterIssuer"):
            return name, kind, False, ""
        rt = self.ctl.rt("cert-manager.io", "v1", "clusterissuers" if kind == "ClusterIssuer" else "issuers")
        if rt is None:
            return name, kind, False, ""
        ns = "" if kind == "ClusterIssuer" else cert["metadata"]["namespace"]
        issuer = self.ctl.store.get(rt.storage_key, ns, name)
        if issuer is None:
            return name, kind, False, f'Referenced "{kind}" not found: {rt.qualified_resource} "{name}" not found'
        server = str(((issuer.get("spec") or {}).get("acme") or {}).get("server") or "")
        return name, kind, "staging" in server.lower(), ""

    def _one(self, cert_rt: Any, cert: JSONObj) -> None:  # noqa: PLR0915
        ctl = self.ctl
        meta, spec = cert["metadata"], cert.get("spec") or {}
        ns = meta["namespace"]
        previous = (cert.get("status") or {}).get("conditions")
        issuer, kind, staging, why = self._issuer(cert)
        secret_name = str(spec.get("secretName") or "")
        if not secret_name:
            why = why or "spec.secretName is not set"
        if why:
            from .controllers import _cond

            ctl.set_status(cert_rt, cert, {**(cert.get("status") or {}), "conditions": [
                {**_cond("Ready", "False", "Pending", why, previous),
                 "observedGeneration": meta.get("generation", 1)}]},
                MANAGER)
            ctl.event(cert, "Warning", "IssuerNotReady" if "issuer" in why.lower() else "Invalid", why, "cert-manager")
            return
        dns = [str(d) for d in spec.get("dnsNames") or []]
        ips = [str(i) for i in spec.get("ipAddresses") or []]
        common = str(spec.get("commonName") or (dns[0] if dns else ""))
        ca_cert, ca_key = self._ca(issuer, staging)
        secret_rt = ctl.must_rt("", "v1", "secrets")
        secret = ctl.store.get(secret_rt.storage_key, ns, secret_name)
        leaf = self._leaf_of(secret)
        now = datetime.datetime.now(datetime.UTC)
        duration = parse_duration(spec.get("duration")) or DEFAULT_DURATION
        renew_before = parse_duration(spec.get("renewBefore")) or duration / 3
        reason = ""
        if secret is None or leaf is None:
            reason = "Issuing certificate as Secret does not exist"
        else:
            ann = secret["metadata"].get("annotations") or {}
            if self._sans(leaf) != (sorted(dns), sorted(ips)):
                reason = "Issuing certificate as Secret was previously issued for different names"
            elif ann.get("cert-manager.io/issuer-name") != issuer or ann.get("cert-manager.io/issuer-kind") != kind:
                reason = "Issuing certificate as Secret was previously issued by a different issuer"
            elif leaf.issuer != ca_cert.subject:
                reason = "Issuing certificate as Secret was issued by another CA"
            elif now >= pki.not_valid_after(leaf) - renew_before:
                reason = "Renewing certificate as renewal was scheduled"
        revision = int((cert.get("status") or {}).get("revision") or 0)
        if reason:
            leaf, key_pem = self._issue(spec, common, dns, ips, ca_cert, ca_key, duration)
            revision += 1
            data = {"tls.crt": _pem(leaf) + _pem(ca_cert), "tls.key": key_pem, "ca.crt": _pem(ca_cert)}
            template = spec.get("secretTemplate") or {}
            annotations = {**{str(k): str(v) for k, v in (template.get("annotations") or {}).items()},
                           "cert-manager.io/alt-names": ",".join(dns), "cert-manager.io/certificate-name": meta["name"],
                           "cert-manager.io/common-name": common, "cert-manager.io/ip-sans": ",".join(ips),
                           "cert-manager.io/issuer-group": "cert-manager.io", "cert-manager.io/issuer-kind": kind,
                           "cert-manager.io/issuer-name": issuer, "cert-manager.io/uri-sans": ""}
            labels = {**{str(k): str(v) for k, v in (template.get("labels") or {}).items()},
                      "controller.cert-manager.io/fao": "true"}
            import base64

            body = {"metadata": {"name": secret_name, "namespace": ns, "labels": labels, "annotations": annotations},
                    "type": "kubernetes.io/tls",
                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
            with ctl.store.lock:
                current = ctl.store.get(secret_rt.storage_key, ns, secret_name)
                if current is not None and current.get("type") != "kubernetes.io/tls":
                    ctl.delete(secret_rt, ns, secret_name)
                    current = None
                if current is None:
                    ctl.create(secret_rt, body, MANAGER)
                else:
                    new = copy.deepcopy(current)
                    new["metadata"]["labels"] = {**(current["metadata"].get("labels") or {}), **labels}
                    new["metadata"]["annotations"] = {**(current["metadata"].get("annotations") or {}), **annotations}
                    new["data"] = body["data"]
                    new.pop("stringData", None)
                    ctl.update(secret_rt, current, new, MANAGER)
            ctl.log.info(f"cert-manager (stand-in): issued {ns}/{meta['name']} for {dns or ips} by {issuer}"
                         f" ({reason})")
            ctl.event(cert, "Normal", "Issuing", f"The certificate has been successfully issued (revision {revision})",
                      "cert-manager-certificates-issuing")
        assert leaf is not None
        from .controllers import _cond

        not_after = pki.not_valid_after(leaf)
        status = {"conditions": [{**_cond("Ready", "True", "Ready", "Certificate is up to date and has not expired",
                                          previous), "observedGeneration": meta.get("generation", 1)}],
                  "notBefore": _stamp(pki.not_valid_before(leaf)), "notAfter": _stamp(not_after),
                  "renewalTime": _stamp(not_after - renew_before), "revision": max(revision, 1)}
        ctl.set_status(cert_rt, cert, status, MANAGER)

    @staticmethod
    def _leaf_of(secret: JSONObj | None) -> x509.Certificate | None:
        import base64

        if secret is None:
            return None
        raw = (secret.get("data") or {}).get("tls.crt")
        if not raw:
            return None
        try:
            return x509.load_pem_x509_certificate(base64.b64decode(raw))
        except ValueError:
            return None

    @staticmethod
    def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
        try:
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return [], []
        return (sorted(str(v) for v in ext.get_values_for_type(x509.DNSName)),
                sorted(str(v) for v in ext.get_values_for_type(x509.IPAddress)))

    @staticmethod
    def _issue(spec: JSONObj, common: str, dns: list[str], ips: list[str], ca_cert: x509.Certificate,
               ca_key: ec.EllipticCurvePrivateKey, duration: datetime.timedelta) -> tuple[x509.Certificate, str]:
        pk = spec.get("privateKey") or {}
        algorithm = str(pk.get("algorithm") or "RSA").upper()
        key: PrivateKey
        if algorithm == "ECDSA":
            curve: ec.EllipticCurve = {384: ec.SECP384R1(), 521: ec.SECP521R1()}.get(int(pk.get("size") or 256),
                                                                                     ec.SECP256R1())
            key = ec.generate_private_key(curve)
        elif algorithm == "ED25519":
            key = ed25519.Ed25519PrivateKey.generate()
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=int(pk.get("size") or 2048))
        encoding = str(pk.get("encoding") or "PKCS1")
        fmt = serialization.PrivateFormat.PKCS8 if encoding == "PKCS8" or algorithm == "ED25519" else \
            serialization.PrivateFormat.TraditionalOpenSSL
        key_pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)] if common else [])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + duration)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=algorithm == "RSA",
                                                content_commitment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=not common)
        return builder.sign(ca_key, hashes.SHA256()), key_pem
