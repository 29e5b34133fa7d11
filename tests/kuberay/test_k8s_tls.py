"""TLS in the KubeRay manifests: Serve answers HTTPS with the orfeas-serve-tls Secret and the
ingress controller speaks HTTPS to it; Ray's own TLS between the serving cluster's pods, each
pod's certificate made by the ray-tls initContainer (cluster/ray_tls.py) from the orfeas-ray-ca
Secret. The initContainer's command is run here as the manifest writes it."""

from __future__ import annotations

import ipaddress
import os
import ssl
import subprocess
import sys

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from k8s_fixtures import fresh, rendered  # noqa: F401  (fixtures)

from cluster import k8s_render, k8s_validate, ray_tls

SERVING = [o for o in k8s_render.ALL_TARGETS if o != "jobs"]
find = k8s_render.find_object


def make_ca(d):
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orfeas ray CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = (x509.CertificateBuilder(subject_name=name, issuer_name=name, public_key=key.public_key(),
                                  serial_number=x509.random_serial_number(), not_valid_before=now,
                                  not_valid_after=now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256()))
    d.mkdir()
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return d


def pods(objs):
    return list(k8s_validate.pod_specs(find(objs, "RayService")))


@pytest.mark.parametrize("overlay", SERVING)
def test_serve_https_and_ray_tls_on_every_serving_pod(rendered, overlay):
    objs = rendered[overlay]
    svc = find(objs, "RayService")
    http = yaml.safe_load(svc["spec"]["serveConfigV2"])["http_options"]
    cert_dir = os.path.dirname(http["ssl_certfile"])
    for where, pod in pods(objs):
        ray = pod["containers"][0]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in ray["volumeMounts"]}
        assert volumes[mounts[cert_dir]]["secret"]["secretName"] == "orfeas-serve-tls", where
        env = {e["name"]: e.get("value") for e in ray["env"]}
        assert env["RAY_USE_TLS"] == "1", where
        assert volumes[mounts[os.path.dirname(env["RAY_TLS_SERVER_CERT"])]] == \
            {"name": "ray-tls", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
        (init,) = [c for c in pod["initContainers"] if c["name"] == "ray-tls"]
        init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
        assert volumes["ray-ca"]["secret"]["secretName"] == "orfeas-ray-ca"
        assert init_mounts["ray-tls"] == os.path.dirname(env["RAY_TLS_SERVER_CERT"])
        assert init["image"] == ray["image"]  # the image that has cluster/ray_tls.py
    auto = svc["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert {e["name"]: e["value"] for e in auto["env"]}["RAY_USE_TLS"] == "1"
    api = find(objs, "Ingress", "orfeas-api")
    assert api["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"


@pytest.mark.parametrize("overlay", k8s_render.ALL_TARGETS)
def test_every_ray_cluster_runs_ray_tls(rendered, overlay):
    """The job clusters (RayCronJobs, RayJobs) too: they carry documents and their chunks."""
    clusters = [o for o in rendered[overlay] if o["kind"] in ("RayService", "RayJob", "RayCronJob")]
    assert clusters and not [p for o in clusters for p in k8s_validate.ray_tls_problems(o)]
    for o in clusters:
        for where, pod in k8s_validate.pod_specs(o):
            if "submitterPodTemplate" not in where:
                assert {"ray-tls", "ray-ca"} <= {v["name"] for v in pod["volumes"]}, (o["metadata"]["name"], where)


def test_a_pod_without_ray_tls_fails_the_check(fresh):
    objs = fresh("dev")
    head = find(objs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["env"] = [e for e in head["containers"][0]["env"] if e["name"] != "RAY_USE_TLS"]
    head["initContainers"] = []
    auto = find(objs, "RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"]
    auto["volumeMounts"] = []
    problems = k8s_validate.policy_problems(objs)
    assert any("RayService/orfeas: spec.rayClusterConfig.headGroupSpec" in p and "RAY_USE_TLS is not 1" in p
               for p in problems), problems
    assert any("no ray-tls initContainer" in p for p in problems)
    assert any("autoscalerOptions: RAY_TLS_SERVER_CERT" in p and "not a file under" in p for p in problems)


def test_the_init_containers_command_issues_a_pod_certificate_the_ca_verifies(rendered, tmp_path):
    """The ray-tls initContainer's command, with the pod's downward-API values filled in, writes a
    certificate for the pod IP and the Service names that verifies against the CA, mode 0600 key."""
    _, pod = pods(rendered["dev"])[0]
    (init,) = [c for c in pod["initContainers"] if c["name"] == "ray-tls"]
    ca_dir, out_dir = make_ca(tmp_path / "ca"), tmp_path / "tls"
    args = [a.replace("$(POD_IP)", "10.1.2.3").replace("$(POD_NAME)", "orfeas-head-x")
            .replace("/etc/ray/ca", str(ca_dir)).replace("/etc/ray/tls", str(out_dir)) for a in init["command"]]
    assert args[:3] == ["python", "-m", "cluster.ray_tls"]
    r = subprocess.run([sys.executable, *args[1:]], cwd=k8s_render.REPO_ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    cert = x509.load_pem_x509_certificate((out_dir / "tls.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in san.get_values_for_type(x509.IPAddress)
    assert {"orfeas-head-x", "*.orfeas.svc.cluster.local", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert (out_dir / "tls.key").stat().st_mode & 0o777 == 0o600
    ctx = ssl.create_default_context(cafile=str(out_dir / "ca.crt"))  # ca.crt is handed on as well
    ctx.load_cert_chain(out_dir / "tls.crt", out_dir / "tls.key")  # the key matches
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)


def test_a_missing_ca_is_named(tmp_path):
    with pytest.raises(ray_tls.CaError, match="ca.key is missing: the orfeas-ray-ca Secret needs"):
        (tmp_path / "ca").mkdir()
        (tmp_path / "ca" / "ca.crt").write_text("x")
        ray_tls.issue(tmp_path / "ca", tmp_path / "out", ["10.0.0.1"], [])
    r = subprocess.run([sys.executable, "-m", "cluster.ray_tls", "--ca-dir", str(tmp_path / "none"), "--out-dir",
                        str(tmp_path / "out")], cwd=k8s_render.REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "ray-tls:" in r.stderr and "ca.crt is missing" in r.stderr
