"""``leanfm serve``: prepare a model, run an OpenAI-compatible server on it until Ctrl-C."""
from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path


def add_arguments(s: argparse.ArgumentParser) -> None:
    from ..runtimes import GGUF_TYPES
    from .serve import SERVE_RUNTIMES

    s.add_argument("--recipe", default=None, help="apply this recipe first (built-in name or YAML); default: the model as it is")
    s.add_argument("--runtime", default="torch", help=f"the server: {', '.join(SERVE_RUNTIMES)} (default torch: transformers serve)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--threads", type=int, default=None, help="CPU threads of the server (default: all cores)")
    s.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="torch: transformers' continuous batching with a paged KV cache (default on; --no-continuous-batching "
                        "serves each request on its own)")
    s.add_argument("--type", dest="gguf_type", choices=GGUF_TYPES, default="auto",
                   help="llama.cpp: the GGUF type (auto: the block type of the recipe's grid, f32 for a float model)")
    s.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp: context length per sequence (default 2048)")
    s.add_argument("--kv-cache-type", default="f16", help="llama.cpp: the K/V cache type, f16 | q8_0 | q4_0 (quantized: flash "
                   "attention on; default f16)")
    s.add_argument("--workdir", default=None, help="where the prepared model and server.log go (default runs/serve-<timestamp>)")
    s.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the server to answer (default 600)")
    s.add_argument("--for", dest="for_seconds", type=float, default=None, help="stop after this many seconds (default: until Ctrl-C)")
    g = s.add_argument_group("calibration (for recipes that need it)")
    g.add_argument("--calib-dataset", default="gensim-wiki")
    g.add_argument("--calib-samples", type=int, default=32)
    g.add_argument("--calib-seqlen", type=int, default=512)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds through serve.running, which stops the server


def run(a) -> int:
    import os

    from .. import progress
    from ..data.calib import Calibration
    from ..outdir import default_out
    from .serve import check_port, check_runtime, command, prepare, running

    check_runtime(a.runtime)
    check_port(a.host, a.port)  # before any work: a port in use is found in a second, not after the export
    command(a.runtime, Path("x"), a.host, a.port, 1, a.continuous_batching, a.n_ctx, a.kv_cache_type)  # refuses bad options early
    threads = a.threads or os.cpu_count() or 1
    workdir = Path(a.workdir) if a.workdir else default_out("serve")
    calib = Calibration(dataset=a.calib_dataset, n=a.calib_samples, seqlen=a.calib_seqlen)
    path = prepare(a.model, a.recipe, a.runtime, workdir, a.gguf_type, calib)
    signal.signal(signal.SIGTERM, _terminate)
    with running(a.runtime, path, a.host, a.port, threads, workdir, a.continuous_batching, a.ready_timeout, a.n_ctx,
                 a.kv_cache_type) as (base, proc):
        print(f"serving {a.model}{' + ' + a.recipe if a.recipe else ''} on {a.runtime} at {base} (pid {proc.pid}; log "
              f"{workdir / 'server.log'}); Ctrl-C stops it", flush=True)
        t0 = time.monotonic()
        try:
            while proc.poll() is None and (a.for_seconds is None or time.monotonic() - t0 < a.for_seconds):
                time.sleep(0.5)
        except KeyboardInterrupt:
            progress.info("stopping the server")
        if proc.poll() is not None:
            progress.info(f"the server exited with code {proc.returncode} (log: {workdir / 'server.log'})")
            return 1
    return 0
