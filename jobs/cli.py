"""What every `python -m jobs.X` entry point shares: its argument parser's common options, the
logging and log-redaction set-up, and joining the cluster."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from config import Settings, load_settings
from config.names import ACTOR_NAMESPACE


def job_parser(module: str, doc: str, *, address: bool = False) -> argparse.ArgumentParser:
    """A parser named after the job's module, described by its docstring's first paragraph, with
    `--config` (and `--address` for jobs that may reach a serving cluster through Ray Client)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="orfeas.yaml to read")
    if address:
        parser.add_argument("--address", default=None, help="the cluster to join (default: ray.address; "
                            "ray://HOST:10001 reaches a serving cluster from a job's own one)")
    return parser


def job_settings(args: argparse.Namespace, *, redact_logs: bool = True) -> Settings:
    """The job's settings, with logging configured; the job's log lines never carry raw PII
    (`pii.logs`) unless `redact_logs` is off."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(args.config)
    if redact_logs:
        from security.log_redaction import install_log_redaction

        install_log_redaction(settings)
    return settings


def join_cluster(settings: Settings, address: str | None = None) -> None:
    """Connect this driver to the cluster (`address`, else `ray.address`, else a local one) unless
    it already is."""
    import ray

    if not ray.is_initialized():
        if not (address or settings.ray.address or os.environ.get("RAY_ADDRESS")) and \
                settings.ray.node_ip_address in ("127.0.0.1", "localhost", "::1"):
            # A job run by hand on the machine of a loopback head (`orfeas up`): Ray must not turn
            # 127.0.0.1 into the outward address, as cluster.local.connect explains.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False
        ray.init(address=address or settings.ray.address or None, namespace=ACTOR_NAMESPACE, log_to_driver=False)
