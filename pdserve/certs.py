"""`pdserve certs`: a development certificate authority and one certificate per component, for
mutual TLS between components (and HTTPS at the gateway).

Every certificate is valid for both ends of a connection (server and client auth), names
`localhost`, 127.0.0.1, ::1, the cluster name `pdserve-cluster` and any extra hosts given, and is
signed by the CA. A fleet whose pods have no stable names sets `cluster.tls_server_name:
pdserve-cluster`, so each peer is checked against that name (and the CA) instead of its address.
Keys are written readable by their owner only. For production, use certificates from your own
CA (cert-manager on Kubernetes); this is for development and tests.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pathlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLUSTER_NAME = "pdserve-cluster"
COMPONENTS = ("router", "worker", "gateway", "admin")
_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class CertFiles:
    ca_file: pathlib.Path
    cert_file: pathlib.Path
    key_file: pathlib.Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pdserve development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _sans(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in (*_LOOPBACK_NAMES, CLUSTER_NAME, *_LOOPBACK_IPS, *hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(list(dict.fromkeys(names)))


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: pathlib.Path, data: bytes, private: bool = False) -> None:
    # Created with owner-only permissions from the start: no window where another user can read a key.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_dev_pki(out_dir: pathlib.Path, components: tuple[str, ...] = COMPONENTS,
                 hosts: tuple[str, ...] = (), days: int = 30) -> dict[str, CertFiles]:
    """Write ca.pem plus <component>.pem / <component>-key.pem for each component into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("pdserve development CA")
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    ca_file = out_dir / "ca.pem"
    _write(ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    files = {}
    for component in components:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (_builder(_name(f"pdserve {component}"), ca_name, key.public_key(), days)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_sans(hosts), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_file, key_file = out_dir / f"{component}.pem", out_dir / f"{component}-key.pem"
        _write(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        _write(key_file, _key_pem(key), private=True)
        files[component] = CertFiles(ca_file, cert_file, key_file)
    return files


def cluster_env(files: CertFiles) -> dict[str, str]:
    """The PDSERVE_* variables that give a component its mutual TLS material."""
    return {"PDSERVE_CLUSTER__TLS_CA_FILE": str(files.ca_file),
            "PDSERVE_CLUSTER__TLS_CERT_FILE": str(files.cert_file),
            "PDSERVE_CLUSTER__TLS_KEY_FILE": str(files.key_file)}
