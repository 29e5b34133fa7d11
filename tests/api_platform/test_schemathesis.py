"""schemathesis (pinned in the dev extra) against every app's /openapi.json on the package's live platform
(conftest.py): generated requests, real HTTP on 127.0.0.1, bounded to a few examples per operation.
Fails on any 5xx, an undocumented status, a wrong content type, a response outside its schema,
or a 405 without `Allow` (slow; runs in CI)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow

APPS = {"gateway": "", "rag": "/v1/rag", "workflows": "/v1/workflows", "agents": "/v1/agents"}
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "unsupported_method,allow_header_conformance")


def schemathesis_cli() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    return [str(exe)] if exe.exists() else [shutil.which("schemathesis") or "schemathesis"]


@pytest.mark.parametrize("app", list(APPS))
def test_every_operation_conforms_to_its_openapi(live, app, tmp_path):
    prefix = APPS[app]
    cmd = [*schemathesis_cli(), "run", f"{live['base']}{prefix}/openapi.json", "--url", f"{live['base']}{prefix}",
           "--checks", CHECKS, "--max-examples", "3", "--phases", "examples,coverage,fuzzing",
           "--header", f"Authorization: Bearer {live['admin']}", "--request-timeout", "60",
           "--generation-deterministic", "--max-failures", "10", "--no-color"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its .schemathesis/ there
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
