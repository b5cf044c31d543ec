"""`mmserve up` starts the stack as separate processes and stops it without orphans or stale ports."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest

from stack.ports import free_port, port_is_free
from mmserve.media.samples import make_video


def _start_up(tiny_model, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "stack.cli", "up", "--model", str(tiny_model),
                                "--port", str(port), "--log-level", "WARNING"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()  # blocks until healthy (or the launcher exits)
    assert f"router listening on 127.0.0.1:{port}" in line, line
    return process


def _listening_ports(processes) -> set[int]:
    return {c.laddr.port for p in processes for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_serves_then_stops_cleanly(tiny_model, tmp_path, sig):
    port = free_port()
    up = _start_up(tiny_model, port)
    try:
        children = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        for service in ("services.decoder", "services.encoder", "services.llm", "services.router", "redis-server"):
            assert service in names
        ports = _listening_ports(children)
        assert port in ports and len(ports) >= 5

        clip = tmp_path / "clip.mp4"
        clip.write_bytes(make_video(seconds=1.0, width=112, height=84))
        answer = subprocess.run([sys.executable, "-m", "stack.cli", "generate", "--addr", f"127.0.0.1:{port}",
                                 "--prompt", "What is this?", "--video", str(clip), "--max-tokens", "8"],
                                capture_output=True, text=True, timeout=120)
        assert answer.returncode == 0, answer.stderr
        assert "completion_tokens=8" in answer.stdout and "ttft" in answer.stdout
    finally:
        up.send_signal(sig)
        assert up.wait(timeout=60) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphans left: {alive}"
    assert all(port_is_free("127.0.0.1", p) for p in ports)


def test_up_refuses_a_taken_port(tiny_model):
    port = free_port()
    up = _start_up(tiny_model, port)
    try:
        second = subprocess.run([sys.executable, "-m", "stack.cli", "up", "--model", str(tiny_model),
                                 "--port", str(port)], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert f"port {port}" in second.stderr and "already in use" in second.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
