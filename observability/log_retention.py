"""Retention of log files: files under the given folders last modified before a cutoff are
deleted (empty folders left behind too). Open files are fine to unlink on POSIX: a writer that
still holds one keeps writing to it until it rotates."""

from __future__ import annotations

import os
from pathlib import Path


def prune_logs(dirs: list[str | Path], before: float) -> dict[str, int]:
    """Delete files older than `before` (epoch seconds) under each folder; returns files and bytes removed."""
    files = size = 0
    for root in dirs:
        root = Path(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames:
                p = Path(dirpath, name)
                try:
                    st = p.lstat()
                    if st.st_mtime < before:
                        p.unlink()
                        files += 1
                        size += st.st_size
                except FileNotFoundError:
                    continue
            if Path(dirpath) != root and not os.listdir(dirpath):
                os.rmdir(dirpath)
    return {"files": files, "bytes": size}
