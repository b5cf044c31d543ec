"""Faults benchmark: a mixed trace at half capacity while `mmserve up` loses each part to kill -9, once each.

    python benchmarks/faults.py [--preset tiny] [--duration-s 60] [--capacity X]

Starts `mmserve up` (a random-weight model of --preset's size, its private redis-server), measures capacity
(completed req/s of the mixed trace with 8 closed-loop clients) unless given, then replays duration-s of Poisson
arrivals at half of it while killing the decoder, encoder, llm, Redis and router with SIGKILL at evenly spaced
times. A failed request touched a kill when it needed the killed part (the decoder and encoder: image and video;
the llm and router: all; Redis: none, its death is a cache miss) and was in flight between the kill and the
first completion of a request that needed the part and was sent after the kill (served again). Per kill: failed
requests it explains, seconds until the restarted part reports healthy, seconds until served again, requests
completed after it until the next kill. Last line: accepted_lost=N (accepted requests that failed without
touching a kill) served_after_restart=F (share of accepted requests sent after a part was served again, outside
any kill's window, that completed).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import mmserve  # noqa: F401  (first: turns gRPC's fork handlers off before grpc loads; see its __init__)
import psutil

from mmserve import rpc
from stack.ports import free_port
from mmserve.models.tiny import build_tiny_model
from mmserve.v1 import api_pb2_grpc

# Sibling modules: the scripts run as `python benchmarks/<name>.py`.
from overload import capacity
from workload import LOOSE_SLO_CAPS, CLASSES, Outcome, _channel, build, failures, make_media, make_trace, run_one

VICTIMS = ("decoder", "encoder", "llm", "redis", "router")
NEEDS = {"decoder": {"image", "video"}, "encoder": {"image", "video"}, "llm": set(CLASSES), "redis": set(),
         "router": set(CLASSES)}
LOOSE = {c: 1e9 for c in CLASSES} | {"tpot": 1e9}  # availability is measured here, not admission


@dataclasses.dataclass
class Sent:
    outcome: Outcome
    start: float
    end: float


@dataclasses.dataclass
class Kill:
    victim: str
    at: float
    healthy: float = float("nan")  # when the restarted part reported healthy
    served: float = float("nan")  # when the first request needing it, sent after the kill, completed


def child(up: subprocess.Popen, victim: str) -> psutil.Process:
    """The live child of `mmserve up` that runs victim (StopIteration while there is none)."""
    marker = "redis-server" if victim == "redis" else f"services.{victim}"
    return next(p for p in psutil.Process(up.pid).children() if marker in " ".join(_cmdline(p)))


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # a killed child not yet reaped by the launcher
        return []


async def wait_restarted(up: subprocess.Popen, victim: str, old_pid: int) -> None:
    """Returns once a new process of victim runs and answers: SERVING for a service, PONG for Redis."""
    import redis.asyncio as aioredis

    while True:  # the launcher restarts it after its backoff; nothing to wait on but the process table
        try:
            new = child(up, victim)
            if new.pid != old_pid:
                break
        except StopIteration:
            pass
        await asyncio.sleep(0.1)
    cmdline = " ".join(_cmdline(new))  # redis-server shows "redis-server 127.0.0.1:PORT" as its title
    port = (re.search(r"--port (\d+)", cmdline) or re.search(r":(\d+)", cmdline)).group(1)
    while victim != "redis":
        try:  # short tries on fresh channels: one channel's reconnect backoff would overstate the time
            await rpc.wait_healthy(f"127.0.0.1:{port}", 0.5)
            return
        except (TimeoutError, ConnectionError):
            pass
    client = aioredis.Redis(port=int(port))
    while True:
        try:
            await client.ping()
            await client.aclose()
            return
        except (OSError, aioredis.ConnectionError):
            await asyncio.sleep(0.05)


async def run(address: str, up: subprocess.Popen, rate: float, duration_s: float, max_tokens: int,
              media) -> tuple[list[Sent], list[Kill], float]:
    """The trace with Poisson arrivals and the kills; returns what was sent, the kills and the start time."""
    rng = random.Random(3)
    trace = make_trace(int(rate * duration_s), [0.3, 0.3, 0.4], seed=1)
    sent: list[Sent] = []
    kills: list[Kill] = []
    async with _channel(address) as channel:
        stub = api_pb2_grpc.RouterStub(channel)
        start = time.perf_counter()

        async def one(i: int, cls: str) -> None:
            t = time.perf_counter()
            o = await run_one(stub, cls, build(cls, i, media, LOOSE, max_tokens, "faults"))
            sent.append(Sent(o, t, time.perf_counter()))

        async def killer() -> None:
            for n, victim in enumerate(VICTIMS):
                await asyncio.sleep(start + duration_s * (n + 1) / (len(VICTIMS) + 1) - time.perf_counter())
                old = child(up, victim)
                old.send_signal(signal.SIGKILL)
                kill = Kill(victim, time.perf_counter())
                kills.append(kill)
                print(f"  {kill.at - start:5.1f} s: killed {victim} (pid {old.pid})", file=sys.stderr)
                await wait_restarted(up, victim, old.pid)
                kill.healthy = time.perf_counter()

        tasks = [asyncio.ensure_future(killer())]
        for i, cls in enumerate(trace):
            tasks.append(asyncio.ensure_future(one(i, cls)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return sent, kills, start


def attribute(sent: list[Sent], kills: list[Kill]) -> dict[int, Kill | None]:
    """For each failed, accepted request (by index in sent): the kill it touched, or None (lost)."""
    for kill in kills:
        served = [s.end for s in sent if s.outcome.code == "OK" and s.start > kill.at and s.outcome.cls in
                  NEEDS[kill.victim]]
        kill.served = min(served, default=float("inf")) if NEEDS[kill.victim] else kill.at
    blamed = {}
    for i, s in enumerate(sent):
        if s.outcome.code in ("OK", "RESOURCE_EXHAUSTED"):
            continue
        blamed[i] = next((k for k in kills if s.outcome.cls in NEEDS[k.victim]
                          and s.start <= max(k.healthy, k.served) and s.end >= k.at), None)
    return blamed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=60.0, help="length of the trace")
    parser.add_argument("--preset", default="tiny", help="model size (mmserve tiny-model --preset)")
    parser.add_argument("--load", type=float, default=0.5, help="offered rate as a share of the measured capacity")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--capacity", type=float, default=0.0, help="req/s: skip measuring it (0: measure)")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="mmserve-faults-")
    model = str(build_tiny_model(pathlib.Path(workdir) / "model", seed=0, preset=args.preset))
    port = free_port()
    stderr = open(pathlib.Path(workdir) / "up.log", "w")
    up = subprocess.Popen([sys.executable, "-m", "stack.cli", "up", "--model", model, "--port", str(port),
                           "--log-level", "WARNING", "--router-flags", " ".join(LOOSE_SLO_CAPS)],
                          stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = up.stdout.readline()
        assert "router listening" in line, f"mmserve up did not start; see {stderr.name}"
        address = f"127.0.0.1:{port}"
        measured = args.capacity or asyncio.run(capacity(address, make_trace(48, [0.3, 0.3, 0.4], seed=7),
                                                         make_media(seed=1), LOOSE, args.max_tokens, 8))
        rate = args.load * measured
        print(f"capacity {measured:.2f} req/s; offering {rate:.2f} req/s for {args.duration_s:.0f} s",
              file=sys.stderr)
        sent, kills, start = asyncio.run(run(address, up, rate, args.duration_s, args.max_tokens,
                                             make_media(8, seed=2)))
        exited = up.poll()
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
        stderr.close()
    restarts = re.findall(r"(\S+) restarted \(restart", open(stderr.name).read())

    blamed = attribute(sent, kills)
    outcomes = [s.outcome for s in sent]
    print(f"failures: {failures(outcomes)}", file=sys.stderr)
    print(f"launcher restarts logged: {restarts}; launcher still running during the trace: {exited is None}",
          file=sys.stderr)
    ends = [k.at for k in kills[1:]] + [float("inf")]
    print(f"{'killed':<9}{'at s':>7}{'failed':>8}{'s to healthy':>14}{'s to served':>13}{'served after':>14}")
    for kill, until in zip(kills, ends):
        failed = sum(k is kill for k in blamed.values())
        after = sum(s.outcome.code == "OK" and max(kill.healthy, kill.served) < s.start < until for s in sent)
        print(f"{kill.victim:<9}{kill.at - start:>7.1f}{failed:>8}{kill.healthy - kill.at:>14.1f}"
              f"{kill.served - kill.at:>13.1f}{after:>14}")
    accepted_lost = sum(k is None for k in blamed.values())
    windows = [(k.at, max(k.healthy, k.served)) for k in kills]
    after = [s for s in sent if s.outcome.code != "RESOURCE_EXHAUSTED" and s.start > windows[0][1]
             and not any(a <= s.end and s.start <= b for a, b in windows)]
    share = sum(s.outcome.code == "OK" for s in after) / len(after) if after else float("nan")
    print(f"accepted_lost={accepted_lost} served_after_restart={share:.2f}")


if __name__ == "__main__":
    main()
