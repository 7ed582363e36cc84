"""``leanfm serve``: an existing OpenAI-compatible server on a (compressed) model.

leanfm writes no HTTP server. It prepares the model (applies the recipe, writes the file the
server reads), launches the server as a child process, waits until ``/v1/models`` answers, and
stops it on exit, on Ctrl-C or when leanfm itself dies:

- ``torch``: transformers' ``transformers serve`` on a Hugging Face folder, with continuous
  batching (paged attention) unless ``continuous_batching=False``. Float recipes only: packed
  int layers are leanfm's own kernels, which plain transformers does not run.
- ``llama.cpp``: llama-cpp-python's server (``python -m llama_cpp.server``) on a GGUF export
  (leanfm's own codes where the recipe's grid fits the block type). It serves one request at a
  time; the others queue (``--interrupt_requests false``: by default a new request would cut the
  running one short).
- ``vllm``: ``vllm serve`` on a Hugging Face folder, when vLLM is installed and a GPU is present.

The child runs in its own process group (so stopping it stops whatever it spawned) and gets
``SIGTERM`` from the kernel if leanfm dies without cleaning up (``PR_SET_PDEATHSIG``). Its output
goes to ``<workdir>/server.log``.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import LeanfmError

SERVE_RUNTIMES = ("torch", "llama.cpp", "vllm")
# what each runtime's server imports, and the command that installs it
_NEEDS = {
    "torch": (("fastapi", "uvicorn", "openai", "pydantic"), "pip install 'leanfm[serve]'"),
    "llama.cpp": (("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"),
                  "pip install 'leanfm[serve]'"),
    "vllm": (("vllm",), "pip install 'leanfm[vllm]' (on a machine with a CUDA GPU)"),
}


def check_runtime(runtime: str) -> None:
    """One-line error for an unknown runtime or a missing package (naming the install command)."""
    if runtime not in SERVE_RUNTIMES:
        raise LeanfmError(f"unknown serving runtime '{runtime}'; choose one of: {', '.join(SERVE_RUNTIMES)}")
    mods, cmd = _NEEDS[runtime]
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    if missing:
        raise LeanfmError(f"the {runtime} server needs {', '.join(missing)}, which is not installed; install it with: {cmd}")
    if runtime == "vllm":
        import torch

        if not torch.cuda.is_available():
            raise LeanfmError("vLLM serves on a CUDA GPU and torch sees none here; use --runtime torch or llama.cpp")


def check_port(host: str, port: int) -> None:
    """One-line error when ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    if not 0 < port < 65536:
        raise LeanfmError(f"--port must be in 1..65535 (got {port})")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    # as servers do: connections of a server stopped a moment ago (TIME_WAIT) do not block the
    # port, a live listener still does
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        if e.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            raise LeanfmError(f"port {port} on {host} is in use; stop what listens there or pick another with --port") from None
        raise LeanfmError(f"cannot listen on {host}:{port}: {e.strerror}; pass a local --host such as 127.0.0.1") from None
    finally:
        s.close()


def _packs_int_weights(model) -> bool:
    from ..kernels.qlinear import QuantLinear

    return any(isinstance(m, QuantLinear) or type(m).__name__ == "FusedSlice" for m in model.modules())


def prepare(model_name: str, recipe: str | None, runtime: str, workdir: Path, gguf_type: str = "auto", calib=None) -> Path:
    """The file or folder the server reads: ``model_name`` after ``recipe``, written under ``workdir``
    (a ``.gguf`` for llama.cpp, a Hugging Face folder otherwise). A ``.gguf`` path is served as is."""
    src = Path(model_name)
    if src.suffix == ".gguf":
        if runtime != "llama.cpp":
            raise LeanfmError(f"{src} is a GGUF file: serve it with --runtime llama.cpp")
        if not src.is_file():
            raise LeanfmError(f"no GGUF file at {src}")
        if recipe:
            raise LeanfmError("--recipe cannot be applied to a GGUF file; pass the model it came from")
        return src
    import torch

    from ..api import apply_, load

    model, tok = load(model_name)
    if recipe:
        apply_(model, recipe, calib)
    workdir.mkdir(parents=True, exist_ok=True)
    if runtime == "llama.cpp":
        from ..runtimes import export_for

        return export_for("llama.cpp", model, tok, workdir / "model", gguf_type)
    if _packs_int_weights(model):
        raise LeanfmError(f"recipe {recipe} packs int weights into leanfm's own kernels, which plain transformers cannot run; "
                          "serve it with --runtime llama.cpp (GGUF), or pick a float recipe for --runtime torch")
    from ..models.checkpoint import save_checkpoint

    with torch.no_grad():
        return Path(save_checkpoint(model, workdir / "hf", tok, overwrite=True))


KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # llama.cpp's ggml type ids for its K/V cache


def command(runtime: str, path: Path, host: str, port: int, threads: int, continuous_batching: bool = True,
            n_ctx: int = 2048, kv_type: str = "f16") -> tuple[list[str], dict]:
    """The server's command line and extra environment. ``kv_type`` (llama.cpp): the K/V cache's
    type; quantized V needs flash attention, which is then switched on."""
    env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if runtime == "llama.cpp":
        if kv_type not in KV_TYPES:
            raise LeanfmError(f"unknown KV cache type '{kv_type}'; choose one of: {', '.join(KV_TYPES)}")
        kv = [] if kv_type == "f16" else ["--type_k", str(KV_TYPES[kv_type]), "--type_v", str(KV_TYPES[kv_type]), "--flash_attn", "true"]
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", host, "--port", str(port),
                "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx), *kv,
                # its default cuts the running request short when a new one arrives; queue instead
                "--interrupt_requests", "false"], env
    if kv_type != "f16":
        raise LeanfmError(f"--kv-cache-type applies to --runtime llama.cpp only (got --runtime {runtime})")
    if runtime == "torch":
        exe = str(Path(sys.executable).with_name("transformers"))
        cb = "--continuous-batching" if continuous_batching else "--no-continuous-batching"
        return [exe, "serve", str(path), "--host", host, "--port", str(port), "--device", "cpu", "--dtype", "float32", cb,
                "--log-level", "warning"], env
    return ["vllm", "serve", str(path), "--host", host, "--port", str(port)], env


def _die_with_parent() -> None:
    os.setsid()  # own process group: stopping the server stops what it spawned
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def wait_ready(proc: subprocess.Popen, base: str, timeout: float, log: Path) -> None:
    """Poll ``base/health`` (transformers, vLLM) or ``base/v1/models`` (llama.cpp) until one answers
    200; one-line error if the server exits or times out."""
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise LeanfmError(f"the server exited with code {proc.returncode} before it was ready: {_last_line(log)} (log: {log})")
        for path in ("/health", "/v1/models"):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + path, timeout=2.0).status_code == 200:
                    return
        time.sleep(0.5)
    stop(proc)
    raise LeanfmError(f"the server did not answer {base}/health or /v1/models within {timeout:.0f} s (log: {log}); raise --ready-timeout")


@contextlib.contextmanager
def running(runtime: str, path: Path, host: str, port: int, threads: int, workdir: Path, continuous_batching: bool = True,
            ready_timeout: float = 600.0, n_ctx: int = 2048, kv_type: str = "f16"):
    """Launch the server on ``path``, wait for it, yield ``(base_url, process)``, stop it on exit."""
    check_runtime(runtime)
    check_port(host, port)
    cmd, env = command(runtime, path, host, port, threads, continuous_batching, n_ctx, kv_type)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env}, preexec_fn=_die_with_parent)
    try:
        base = f"http://{host if ':' not in host else '[' + host + ']'}:{port}"
        wait_ready(proc, base, ready_timeout, log)
        yield base, proc
    finally:
        stop(proc)
