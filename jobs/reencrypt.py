"""Rotate a collection's data key and re-encrypt its chunks under the new one.

    python -m jobs.reencrypt COLLECTION [--config orfeas.yaml]
    ray job submit -- python -m jobs.reencrypt COLLECTION

The work is `rag.reencrypt.reencrypt_collection`; this prints its result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from config import load_settings
from config.names import ACTOR_NAMESPACE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.reencrypt", description=__doc__.split("\n\n")[0])
    parser.add_argument("collection", help="the logical collection")
    parser.add_argument("--config", default=None, help="orfeas.yaml to read")
    parser.add_argument("--actor", default="job:reencrypt", help="who the audit log names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    from rag.reencrypt import reencrypt_collection

    settings = load_settings(args.config)
    if not ray.is_initialized():
        ray.init(address=settings.ray.address or None, namespace=ACTOR_NAMESPACE, log_to_driver=False)
    try:
        out = reencrypt_collection(settings, args.collection, actor=args.actor)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
