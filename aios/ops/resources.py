"""psutil figures of this host and process tree: what heartbeats and /system/resources report."""

from __future__ import annotations

import os
from typing import Any

import psutil


def prime() -> None:
    """psutil's first CPU reading of a process is meaningless (0.0); take it early and throw it away."""
    psutil.cpu_percent(interval=None)


def resource_figures(work_dir: str) -> dict[str, Any]:
    """CPU %, memory %, load average, disk % of ``work_dir``, and RSS of this process and its children."""
    me = psutil.Process()
    rss = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            rss += child.memory_info().rss
        except psutil.Error:
            continue
    try:
        disk_pct = psutil.disk_usage(work_dir).percent
    except OSError:
        disk_pct = None
    return {
        "cpu_pct": psutil.cpu_percent(interval=None),
        "memory_pct": psutil.virtual_memory().percent,
        "load_avg": list(os.getloadavg()),
        "disk_pct": disk_pct,
        "rss_bytes": rss,
        "cpu_count": psutil.cpu_count(),
    }
