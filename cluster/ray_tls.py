"""Per-pod certificates for Ray's own TLS (RAY_USE_TLS), issued by the cluster's CA.

Every Ray process (GCS, raylets, workers, the autoscaler) serves and dials gRPC with mutual TLS
when RAY_USE_TLS=1: its certificate must name the address others reach it at, which on
Kubernetes is the pod's IP, known only once the pod runs. So each Ray pod's initContainer runs

    python -m cluster.ray_tls --ca-dir /etc/ray/ca --out-dir /etc/ray/tls --ip "$POD_IP" --dns "$POD_NAME"...

which signs a fresh key for this pod with the CA in the `orfeas-ray-ca` Secret (ca.crt, ca.key)
and writes tls.crt, tls.key and ca.crt into a memory-backed volume the Ray container reads
(RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY, RAY_TLS_CA_CERT). This is the scheme Ray's TLS guide
describes (an initContainer making pod certificates from a CA Secret), with `cryptography`
instead of an openssl script. docs/kubernetes.md shows how to make the CA.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class CaError(RuntimeError):
    pass


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, object]:
    crt, key = ca_dir / "ca.crt", ca_dir / "ca.key"
    for f in (crt, key):
        if not f.is_file():
            raise CaError(f"{f} is missing: the orfeas-ray-ca Secret needs keys ca.crt and ca.key")
    try:
        return (x509.load_pem_x509_certificate(crt.read_bytes()),
                serialization.load_pem_private_key(key.read_bytes(), password=None))
    except ValueError as e:
        raise CaError(f"{ca_dir}: ca.crt or ca.key is not a PEM certificate/unencrypted key: {e}") from None


def issue(ca_dir: Path, out_dir: Path, ips: list[str], dns: list[str], days: float = 365.0) -> Path:
    """Sign a new key for these addresses with the CA in `ca_dir`; write tls.crt, tls.key
    (mode 0600) and ca.crt into `out_dir`. Returns the certificate's path."""
    ca, ca_key = _load_ca(ca_dir)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(["localhost", *dns]) if d]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in dict.fromkeys(["127.0.0.1", *ips]) if i]
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns or ips or ["ray"])[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            # Ray's processes are servers and clients of each other (mutual TLS): both usages.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_file = out_dir / "tls.key"
    key_file.touch(mode=0o600)
    os.chmod(key_file, 0o600)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    crt = out_dir / "tls.crt"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return crt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ca-dir", type=Path, required=True, help="folder with ca.crt and ca.key (the CA Secret)")
    p.add_argument("--out-dir", type=Path, required=True, help="where tls.crt, tls.key and ca.crt are written")
    p.add_argument("--ip", action="append", default=[], help="an address of this pod (repeatable)")
    p.add_argument("--dns", action="append", default=[], help="a DNS name of this pod (repeatable)")
    p.add_argument("--days", type=float, default=365.0)
    args = p.parse_args(argv)
    try:
        crt = issue(args.ca_dir, args.out_dir, args.ip, args.dns, args.days)
    except (CaError, ValueError) as e:
        p.exit(2, f"ray-tls: {e}\n")
    print(f"ray-tls: wrote {crt} for {', '.join(args.ip + args.dns)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
