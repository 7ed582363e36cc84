"""Where a generation's trials are measured: in this process (default) or on Ray.

Ray: a local cluster started here (``workers`` × ``threads`` CPUs) or an existing one at
``address``. Each trial is one Ray task pinned to ``threads`` CPUs and torch threads; the tasks
open the same results store (a file every worker can reach: on a multi-machine cluster, put
``--store`` and ``--out`` on a shared filesystem).
"""
from __future__ import annotations

import logging
import socket

from ..errors import LeanfmError

RAY_INSTALL = "pip install 'leanfm[ray]'"


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's own minute of retries, when ``host:port`` does not answer."""
    hostport = address.split("://", 1)[-1]
    if hostport == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise LeanfmError(f"cannot connect to the Ray cluster at --address {address}: {e}; check the address (ray status on "
                          "that machine) or drop --address to start a local one") from None


class RayPool:
    def __init__(self, workers: int, threads: int, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise LeanfmError(f"--executor ray needs Ray, which is not installed; install it with: {RAY_INSTALL}") from None
        if workers < 1:
            raise LeanfmError(f"--workers must be at least 1 (got {workers})")
        self.ray, self.started = ray, False
        if not ray.is_initialized():
            quiet = {"log_to_driver": False, "include_dashboard": False, "logging_level": logging.ERROR}
            try:
                if address:
                    _check_reachable(address)
                    ray.init(address=address, **quiet)
                else:
                    ray.init(num_cpus=workers * threads, **quiet)
            except LeanfmError:
                raise
            except Exception as e:  # noqa: BLE001 - Ray raises many kinds (ConnectionError, RuntimeError, ...)
                where = f"the Ray cluster at --address {address}" if address else "a local Ray cluster"
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise LeanfmError(f"cannot connect to {where}: {first}; check the address (ray status on that machine) "
                                  "or drop --address to start a local one") from None
            self.started = True
        from .run import measure_in_worker

        self.task = ray.remote(num_cpus=threads, max_retries=0)(measure_in_worker)

    def map(self, trials: list, args: tuple) -> list:
        """Measure ``trials`` concurrently; results in the same order."""
        refs = [self.task.remote(t, *args) for t in trials]
        return self.ray.get(refs)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
