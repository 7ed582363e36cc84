"""`leanfm serve`: refusals in one line, a real server (transformers serve, llama.cpp's) under a
load test on the tiny model, and no server process left behind when the client is killed
mid-run and the server is stopped."""
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leanfm.errors import LeanfmError
from leanfm.serving import serve

from .stub_openai import free_port
from .test_runtimes import run_cli

LEANFM = str(Path(sys.executable).with_name("leanfm"))


def test_port_in_use_is_named(tmp_path, capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        with pytest.raises(LeanfmError, match=f"port {port} on 127.0.0.1 is in use"):
            serve.check_port("127.0.0.1", port)
        if importlib.util.find_spec("openai") and importlib.util.find_spec("fastapi"):
            code, _, err = run_cli(["serve", "--port", str(port), "--workdir", str(tmp_path / "w")], capsys)
            assert code == 2 and f"port {port} on 127.0.0.1 is in use" in err and len(err.strip().splitlines()) == 1, err
    finally:
        s.close()


def test_unknown_runtime_and_missing_packages_are_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["serve", "--runtime", "tgi", "--workdir", str(tmp_path / "w")], capsys)
    assert code == 2 and "unknown serving runtime 'tgi'" in err and len(err.strip().splitlines()) == 1, err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    code, _, err = run_cli(["serve", "--runtime", "llama.cpp", "--workdir", str(tmp_path / "w")], capsys)
    assert code == 2 and "install it with: pip install 'leanfm[serve]'" in err and "llama_cpp" in err, err
    with pytest.raises(LeanfmError, match="pip install"):
        serve.check_runtime("vllm")


def test_a_packed_recipe_is_refused_for_the_torch_server(tiny_model_dir, tmp_path):
    with pytest.raises(LeanfmError, match="serve it with --runtime llama.cpp"):
        serve.prepare(str(tiny_model_dir), "rtn-w4", "torch", tmp_path / "w")


def _start_serve(args, tmp_path):
    proc = subprocess.Popen([LEANFM, "serve", *args, "--workdir", str(tmp_path / "serve"), "--ready-timeout", "240"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        m = re.search(r"at (http://\S+) \(pid (\d+)", line)
        if m:
            return proc, m.group(1), int(m.group(2))
    proc.kill()
    raise AssertionError("leanfm serve did not come up:\n" + "".join(lines[-20:]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie awaiting its parent's wait is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("runtime", ["torch", "llama.cpp"])
def test_serve_then_loadtest_and_nothing_left_behind(runtime, tiny_model_dir, tiny_text, tmp_path):
    mods = {"torch": ("fastapi", "uvicorn", "openai"), "llama.cpp": ("llama_cpp", "sse_starlette", "starlette_context")}[runtime]
    if any(importlib.util.find_spec(m) is None for m in mods):
        pytest.skip(f"the {runtime} server's packages are not installed (pip install 'leanfm[serve]')")
    from leanfm.measure.loadtest import LoadSpec, run_load

    port = free_port()
    extra = ["--type", "f32"] if runtime == "llama.cpp" else []
    proc, url, server_pid = _start_serve(["--model", str(tiny_model_dir), "--runtime", runtime, "--port", str(port),
                                          "--threads", "1", *extra], tmp_path)
    try:
        res = run_load(url, [("the quick brown fox", 6)], LoadSpec(rate=float("inf"), num_requests=3, drain=120),
                       model=None)
        assert res["metrics"]["completed"] == 3, res["details"]["errors"]
        assert res["metrics"]["ttft_ms_p50"] > 0 and res["metrics"]["output_token_throughput"] > 0
        # concurrent requests queue; none is cut short by the next (llama-cpp-python's server
        # interrupts the running request by default; the tiny model emits no EOS in 6 tokens)
        assert [r["output_tokens"] for r in res["details"]["requests"]] == [6, 6, 6], res["details"]["requests"]
        # a client killed mid-run leaves the server serving
        client = subprocess.Popen([LEANFM, "loadtest", url, "--rate", "inf", "--num-requests", "6", "--max-tokens", "64",
                                   "--dataset", str(tiny_text), "--out", str(tmp_path / "lt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2.0)
        client.kill()
        client.wait(30)
        res = run_load(url, [("again", 3)], LoadSpec(rate=1.0, num_requests=1, drain=120))
        assert res["metrics"]["completed"] == 1, res["details"]["errors"]
        assert _alive(server_pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0
    t0 = time.monotonic()
    while _alive(server_pid) and time.monotonic() - t0 < 15:
        time.sleep(0.2)
    assert not _alive(server_pid), "the server process outlived leanfm serve"


def test_the_server_dies_with_a_killed_leanfm(tiny_model_dir, tmp_path):
    """SIGKILL gives leanfm no chance to clean up: the kernel's parent-death signal stops the server."""
    if any(importlib.util.find_spec(m) is None for m in ("llama_cpp", "sse_starlette", "starlette_context")):
        pytest.skip("llama.cpp's server is not installed (pip install 'leanfm[serve]')")
    proc, url, server_pid = _start_serve(["--model", str(tiny_model_dir), "--runtime", "llama.cpp", "--type", "f32",
                                          "--port", str(free_port()), "--threads", "1"], tmp_path)
    proc.kill()
    proc.wait(30)
    t0 = time.monotonic()
    while _alive(server_pid) and time.monotonic() - t0 < 15:
        time.sleep(0.2)
    assert not _alive(server_pid), "the server outlived a killed leanfm serve"


def test_a_port_left_in_time_wait_by_a_stopped_server_is_free():
    """A server stopped a moment ago leaves its accepted connections in TIME_WAIT; the next server
    (which sets SO_REUSEADDR, as uvicorn does) can bind, so the check must not refuse."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server side closes first: its end goes to TIME_WAIT
    cli.close()
    srv.close()
    serve.check_port("127.0.0.1", port)
