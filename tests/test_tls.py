"""TLS in transit: Serve's HTTPS ingress (serve.tls) and Ray's own TLS between its processes.

The cluster test starts one Ray cluster of its own in a subprocess (tests/tls_cluster.py) with
RAY_USE_TLS=1 and certificates made here with `cryptography`: the gateway answers the real
`openai` client over HTTPS verified against the test CA, refuses plain HTTP, and the GCS speaks
mutual TLS. The rest are unit tests of the settings and the ingress choice."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from config import ModelSpec, Settings
from harness import free_port
from provider_server import ProviderServer
from serve.applications import (HAPROXY_NO_KEY_PASSWORD, IngressError, TlsFileError, check_tls_files, http_options,
                                resolve_ingress, serve_config)

TESTS = Path(__file__).parent


def make_certs(d: Path, hosts: list[str]) -> dict[str, str]:
    """A CA and a server certificate for `hosts` (names or IPs) signed by it, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    life = dict(not_valid_before=now - datetime.timedelta(minutes=1), not_valid_after=now + datetime.timedelta(days=1))
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orfeas test CA")])
    ca = (x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, public_key=ca_key.public_key(),
                                  serial_number=x509.random_serial_number(), **life)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder(subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]),
                                    issuer_name=ca_name, public_key=key.public_key(),
                                    serial_number=x509.random_serial_number(), **life)
            .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca_key, hashes.SHA256()))
    files = {"ca": d / "ca.crt", "cert": d / "tls.crt", "key": d / "tls.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    from ray._common.network_utils import node_ip_address_from_perspective

    # Ray's processes reach each other at the node's address: it must be in the certificate.
    return make_certs(tmp_path_factory.mktemp("tls"), ["localhost", "127.0.0.1", node_ip_address_from_perspective()])


def test_tls_settings_reach_serves_http_options_or_haproxy(certs, monkeypatch):
    s = Settings(serve={"tls": {"certfile": certs["cert"], "keyfile": certs["key"]}})
    assert http_options(s.serve) == {"host": "127.0.0.1", "port": 8000, "ssl_certfile": certs["cert"],
                                     "ssl_keyfile": certs["key"]}
    assert serve_config(s)["http_options"]["ssl_certfile"] == certs["cert"]
    monkeypatch.setattr("shutil.which", lambda name: "/usr/sbin/haproxy")  # as if HAProxy were installed
    # HAProxy terminates TLS (serve/haproxy_wrapper, tests/test_haproxy_wrapper.py); the replicas
    # behind it on the node's loopback serve plain HTTP.
    on_haproxy = resolve_ingress(s)
    assert on_haproxy.serve.ingress == "haproxy"
    assert http_options(on_haproxy.serve) == {"host": "127.0.0.1", "port": 8000}
    env = serve_config(on_haproxy)["controller_options"]["runtime_env"]["env_vars"]
    assert env["ORFEAS_HAPROXY_TLS_CERT"] == certs["cert"] and env["ORFEAS_HAPROXY_TLS_KEY"] == certs["key"]
    # HAProxy cannot read a key with a password: auto takes the proxy, an explicit haproxy is refused.
    locked = s.model_copy(deep=True)
    locked.serve.tls.keyfile_password_env = "ORFEAS_TLS_PASSWORD"
    assert resolve_ingress(locked).serve.ingress == "proxy"
    locked.serve.ingress = "haproxy"
    with pytest.raises(IngressError, match="no passphrase option"):
        resolve_ingress(locked)
    assert "keyfile_password_env" in HAPROXY_NO_KEY_PASSWORD
    assert http_options(Settings().serve) == {"host": "127.0.0.1", "port": 8000}  # plain HTTP by default


def test_bad_tls_files_are_named_before_serve_starts(certs, tmp_path):
    with pytest.raises(ValueError, match="serve.tls needs both certfile and keyfile"):
        Settings(serve={"tls": {"certfile": certs["cert"]}})
    other = make_certs(tmp_path, ["localhost"])
    mismatched = Settings(serve={"tls": {"certfile": certs["cert"], "keyfile": other["key"]}})
    with pytest.raises(TlsFileError, match="cannot use certfile .*tls.crt.* with keyfile"):
        check_tls_files(mismatched.serve)
    missing = Settings(serve={"tls": {"certfile": str(tmp_path / "nope.crt"), "keyfile": certs["key"]}})
    with pytest.raises(TlsFileError, match="nope.crt"):
        check_tls_files(missing.serve)
    locked = Settings(serve={"tls": {"certfile": certs["cert"], "keyfile": certs["key"],
                                     "keyfile_password_env": "ORFEAS_TEST_UNSET_TLS_PASSWORD"}})
    with pytest.raises(TlsFileError, match="ORFEAS_TEST_UNSET_TLS_PASSWORD is not set"):
        check_tls_files(locked.serve)
    assert check_tls_files(Settings(serve={"tls": {"certfile": certs["cert"], "keyfile": certs["key"]}}).serve)[
        "ssl_keyfile"] == certs["key"]


@pytest.fixture(scope="module")
def tls_cluster(certs, tmp_path_factory):
    provider = ProviderServer(free_port()).start()
    port = free_port()
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("tls-data"),
        serve={"host": "127.0.0.1", "port": port, "tls": {"certfile": certs["cert"], "keyfile": certs["key"]}},
        rag={"enabled": False}, agents={"enabled": False}, alerts={"enabled": False},
        models=[ModelSpec(id="echo", engine="openai", base_url=provider.base_url, source="echo")])
    config = tmp_path_factory.mktemp("tls-config") / "settings.json"
    config.write_text(json.dumps(settings.to_dict()))
    env = {**os.environ, "RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": certs["cert"],
           "RAY_TLS_SERVER_KEY": certs["key"], "RAY_TLS_CA_CERT": certs["ca"],
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(TESTS / "tls_cluster.py"), str(config)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=240)
    try:
        assert line and line[0].strip(), "the TLS cluster did not come up (tests/tls_cluster.py)"
        info = json.loads(line[0])
        assert set(info["states"].values()) == {"RUNNING"}, info["states"]
        yield {**info, "port": port}
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        provider.stop()


@pytest.mark.slow
def test_gateway_over_https_and_ray_over_mutual_tls(tls_cluster, certs):
    port, key = tls_cluster["port"], tls_cluster["key"]
    with httpx.Client(verify=ssl.create_default_context(cafile=certs["ca"])) as http:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key=key, http_client=http, max_retries=0)
        r = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "over tls"}])
        assert r.choices[0].message.content == "over tls"
    # Plain HTTP on the same port gets no answer; neither does a client that does not trust the CA.
    plain = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        plain.models.list()
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://127.0.0.1:{port}/v1/models")
    # Ray's GCS answers only TLS, and only to a client certificate from the CA (mutual TLS).
    host, _, gcs_port = tls_cluster["gcs"].rpartition(":")
    ctx = ssl.create_default_context(cafile=certs["ca"])
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(certs["cert"], certs["key"])
    with socket.create_connection((host, int(gcs_port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.getpeercert()["issuer"] == ((("commonName", "orfeas test CA"),),)
    anonymous = ssl.create_default_context(cafile=certs["ca"])
    anonymous.set_alpn_protocols(["h2"])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection((host, int(gcs_port)), timeout=10) as raw, \
                anonymous.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # TLS 1.3 reports a refused client cert here
            if not tls.recv(1):
                raise ConnectionError("closed")


def test_relative_tls_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    from config import load_settings

    (tmp_path / "conf").mkdir()
    f = tmp_path / "conf" / "orfeas.yaml"
    f.write_text("serve:\n  tls: {certfile: ./certs/tls.crt, keyfile: ../tls.key}\n")
    monkeypatch.chdir(tmp_path)
    tls = load_settings(f).serve.tls
    assert (tls.certfile, tls.keyfile) == (str(tmp_path / "conf" / "certs" / "tls.crt"), str(tmp_path / "tls.key"))


def test_the_cli_reaches_an_https_gateway_at_https(certs):
    from cluster.local import api_url

    tls = {"certfile": certs["cert"], "keyfile": certs["key"]}
    assert api_url(Settings(serve={"host": "0.0.0.0", "port": 8443, "tls": tls})) == "https://127.0.0.1:8443"
    assert api_url(Settings()) == "http://127.0.0.1:8000"
