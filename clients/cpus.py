"""The CPUs this process may use, for sizing thread pools in either service (a pod's CPU limit included)."""

from __future__ import annotations

import os
from pathlib import Path


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (a pod's `limits.cpu`).

    torch sizes its thread pool from the host's cores and ignores the quota: in a 2-CPU pod on a 64-core node
    it would run 32 threads into the quota's throttling.
    """
    cpus = len(os.sched_getaffinity(0))
    quota = period = None
    try:  # cgroup v2: "max 100000" or "200000 100000"
        q, per = (cgroup_root / "cpu.max").read_text().split()[:2]
        quota, period = (None if q == "max" else int(q)), int(per)
    except (OSError, ValueError):
        try:  # cgroup v1: -1 for no quota
            quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota is not None and quota > 0 and period:
        cpus = min(cpus, max(1, -(-quota // period)))  # a quota of 1.5 CPUs still runs 2 threads
    return cpus
