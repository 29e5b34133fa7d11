"""A Ray cluster with Ray's own TLS on, running the ORFEAS gateway behind Serve's HTTPS proxy, for
tests/test_tls.py: `python tests/tls_cluster.py SETTINGS.json`, with RAY_USE_TLS=1 and the
RAY_TLS_* files in its environment (Ray reads them when the processes start, so the cluster
cannot be the test session's). It prints one JSON line (the GCS address, an admin API key, the
application states) once the gateway runs, and shuts the cluster down when stdin closes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray


def main() -> None:
    from cluster.deploy import deploy, wait_running
    from config import settings_from_dict
    from security.keys import keystore

    settings = settings_from_dict(json.loads(Path(sys.argv[1]).read_text()))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        states = wait_running(deploy(settings), timeout_s=120)
        _, key = ray.get(keystore(settings.resolved_data_dir()).create.remote("admin", None, "tls-test"))
        gcs = ray.get_runtime_context().gcs_address
        print(json.dumps({"gcs": gcs, "key": key, "states": states}), flush=True)
        sys.stdin.readline()  # until the test is done
    finally:
        ray.shutdown()  # the cluster goes with its Serve apps (no graceful drain needed here)


if __name__ == "__main__":
    main()
