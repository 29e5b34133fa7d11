"""Loopback stand-ins for the key services that live on the internet: Vault's transit engine
and AWS KMS's JSON API. Each keeps real keys (AES-GCM, versioned), checks the request the way
the real service does (Vault: the X-Vault-Token header and the transit paths; KMS: the
X-Amz-Target action, the JSON content type, a SigV4 signature recomputed from the shared
secret, the encryption context) and records every request for the tests to inspect."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class _Server:
    def __init__(self):
        self.requests: list[dict] = []
        self.keys: dict[str, list[bytes]] = {}
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _reply(self, status: int, obj: dict | None):
                data = json.dumps(obj).encode() if obj is not None else b""
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.handle(self, "GET", b"")

            def do_POST(self):
                server.handle(self, "POST", self._body())

            def do_PUT(self):
                server.handle(self, "PUT", self._body())

        return H


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, blob: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(blob[:12], blob[12:], aad)


class VaultTransit(_Server):
    """POST /v1/<mount>/encrypt|decrypt|rewrap/<name>, POST /v1/<mount>/keys/<name>/rotate, GET /v1/<mount>/keys/<name>."""

    def __init__(self, token: str = "s.test-token", mount: str = "transit"):
        super().__init__()
        self.token, self.mount = token, mount

    def handle(self, h, method: str, body: bytes):
        self.requests.append({"method": method, "path": h.path, "token": h.headers.get("X-Vault-Token"),
                              "body": json.loads(body) if body else None})
        if h.headers.get("X-Vault-Token") != self.token:
            return h._reply(403, {"errors": ["permission denied"]})
        m = re.fullmatch(rf"/v1/{self.mount}/(encrypt|decrypt|rewrap|keys)/([A-Za-z0-9_-]+)(/rotate)?", h.path)
        if not m:
            return h._reply(404, {"errors": [f"no handler for route {h.path!r}"]})
        op, name, rotate = m.groups()
        req = json.loads(body) if body else {}
        if op == "keys":
            if name not in self.keys:
                return h._reply(404, {"errors": [f"no key {name}"]})
            if rotate:
                self.keys[name].append(os.urandom(32))
                return h._reply(200, {"data": {"latest_version": len(self.keys[name])}})
            return h._reply(200, {"data": {"name": name, "latest_version": len(self.keys[name])}})
        if op == "encrypt":
            versions = self.keys.setdefault(name, [os.urandom(32)])  # transit upserts the key on first encrypt
            pt = base64.b64decode(req["plaintext"])
            v = len(versions)
            ct = base64.b64encode(_seal(versions[v - 1], pt, name.encode())).decode()
            return h._reply(200, {"data": {"ciphertext": f"vault:v{v}:{ct}", "key_version": v}})
        try:
            _, ver, ct = req["ciphertext"].split(":", 2)
            pt = _open(self.keys[name][int(ver[1:]) - 1], base64.b64decode(ct), name.encode())
        except (KeyError, ValueError, IndexError, InvalidTag):
            return h._reply(400, {"errors": ["invalid ciphertext: unable to decrypt"]})
        if op == "decrypt":
            return h._reply(200, {"data": {"plaintext": base64.b64encode(pt).decode()}})
        v = len(self.keys[name])
        ct = base64.b64encode(_seal(self.keys[name][v - 1], pt, name.encode())).decode()
        return h._reply(200, {"data": {"ciphertext": f"vault:v{v}:{ct}", "key_version": v}})


class AwsKms(_Server):
    """KMS's JSON 1.1 API: Encrypt, Decrypt, ReEncrypt, RotateKeyOnDemand, with SigV4 checked."""

    def __init__(self, key_id: str, access_key: str, secret_key: str, region: str = "eu-west-1"):
        super().__init__()
        self.key_id, self.access_key, self.secret_key, self.region = key_id, access_key, secret_key, region
        self.keys[key_id] = [os.urandom(32)]

    def _check_signature(self, h, body: bytes) -> str | None:
        from security.keyproviders import sigv4_headers
        import datetime as dt

        auth = h.headers.get("authorization", "")
        m = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/kms/aws4_request, "
                         r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})", auth)
        if not m:
            return "missing or malformed SigV4 Authorization"
        ak, _, region, signed, sig = m.groups()
        if ak != self.access_key or region != self.region:
            return "unknown access key or wrong region"
        names = signed.split(";")
        if not {"host", "x-amz-date", "x-amz-target", "content-type"} <= set(names):
            return f"signed headers {signed} leave out required ones"
        now = dt.datetime.strptime(h.headers["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
        expect = sigv4_headers(method="POST", url=self.url + h.path, body=body, region=region, service="kms",
                               access_key=ak, secret_key=self.secret_key, now=now,
                               headers={n: h.headers[n] for n in names if n not in ("host", "x-amz-date")})
        if expect["authorization"].rsplit("Signature=", 1)[1] != sig:
            return "The request signature we calculated does not match the signature you provided."
        return None

    def handle(self, h, method: str, body: bytes):
        target = h.headers.get("x-amz-target", "")
        self.requests.append({"method": method, "path": h.path, "target": target,
                              "content_type": h.headers.get("content-type"), "body": json.loads(body or b"{}")})
        if method != "POST" or h.headers.get("content-type") != "application/x-amz-json-1.1":
            return h._reply(400, {"__type": "SerializationException", "message": "bad content type"})
        problem = self._check_signature(h, body)
        if problem:
            return h._reply(400, {"__type": "InvalidSignatureException", "message": problem})
        req = json.loads(body)
        action = target.removeprefix("TrentService.")
        ctx = json.dumps(req.get("EncryptionContext") or req.get("SourceEncryptionContext") or {},
                         sort_keys=True).encode()
        if action in ("Encrypt", "Decrypt", "ReEncrypt") and req.get("KeyId", req.get("DestinationKeyId",
                                                                                      self.key_id)) != self.key_id:
            return h._reply(400, {"__type": "NotFoundException", "message": "key not found"})
        if action == "Encrypt":
            v = len(self.keys[self.key_id])
            blob = bytes([v]) + _seal(self.keys[self.key_id][v - 1], base64.b64decode(req["Plaintext"]), ctx)
            return h._reply(200, {"CiphertextBlob": base64.b64encode(blob).decode(), "KeyId": self.key_id})
        if action in ("Decrypt", "ReEncrypt"):
            raw = base64.b64decode(req["CiphertextBlob"])
            try:
                pt = _open(self.keys[self.key_id][raw[0] - 1], raw[1:], ctx)
            except (InvalidTag, IndexError):
                return h._reply(400, {"__type": "InvalidCiphertextException", "message": ""})
            if action == "Decrypt":
                return h._reply(200, {"Plaintext": base64.b64encode(pt).decode(), "KeyId": self.key_id})
            dctx = json.dumps(req.get("DestinationEncryptionContext") or {}, sort_keys=True).encode()
            v = len(self.keys[self.key_id])
            blob = bytes([v]) + _seal(self.keys[self.key_id][v - 1], pt, dctx)
            return h._reply(200, {"CiphertextBlob": base64.b64encode(blob).decode(), "KeyId": self.key_id})
        if action == "RotateKeyOnDemand":
            self.keys[self.key_id].append(os.urandom(32))
            return h._reply(200, {"KeyId": self.key_id})
        return h._reply(400, {"__type": "UnknownOperationException", "message": action})
