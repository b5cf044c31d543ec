"""`mmserve up` start-up time and idle memory, through its real CLI.

    python benchmarks/startup.py [--preset small] [--model DIR] [--runs 3] [--idle-s 5]

Each run starts `python -m stack.cli up --model M` and times, from the moment it is spawned:
* healthy: the "router listening" line (every child, router included, reports SERVING);
* first request: a 4-token text answer received through the router over gRPC.
It also sums the CPU seconds the stack's processes used until healthy (on a shared machine a steadier figure of
the work start-up does than the wall time), and reads from the stack's INFO log when the last stage (decoder,
encoder, llm) began serving: "healthy after it" is how long the router and the launcher took to notice.
Then, after --idle-s more seconds of idleness, it reads every process of the stack (the launcher, redis-server, the
services, the decoder's fork server and workers) from /proc: RSS, and PSS, which shares each page among the processes
that map it (forked workers, shared libraries), so the PSS sum counts the machine's memory once.
Prints the cores and load average, each run's table, then the best and median over the runs; last line:
startup_s=X idle_rss_mb=Y (medians).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces): state, ppid, ..."""
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat(entry)[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def process_name(pid: int) -> str:
    """A short name: the service module, redis-server, the decoder's forkserver or worker, or the launcher."""
    argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    joined = b" ".join(argv)
    if b"forkserver" in joined:  # workers fork from the fork server, so they share its command line
        ppid = int(_stat(pid)[1])
        return "decoder worker" if b"forkserver" in pathlib.Path(f"/proc/{ppid}/cmdline").read_bytes() else "forkserver"
    if b"stack.cli" in joined:
        return "launcher"
    if b"resource_tracker" in joined:
        return "resource tracker"  # multiprocessing's, started with the decoder's workers
    module = next((a.decode() for a in argv if a.startswith(b"services.")), None)
    return module.removeprefix("services.") if module else pathlib.Path(argv[0].decode().split()[0]).name


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = _stat(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of one process in MB, from /proc/PID/smaps_rollup."""
    fields = {}
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        fields[key.rstrip(":")] = int(value)
    return fields["Rss"] / 1024, fields["Pss"] / 1024


def stack_memory(pid: int) -> list[tuple[str, int, float, float]]:
    """(name, pid, RSS MB, PSS MB) of every process of the stack."""
    rows = []
    for p in descendants(pid):
        try:
            rows.append((process_name(p), p, *memory_mb(p)))
        except (OSError, KeyError, ValueError):
            continue  # exited meanwhile, or a kernel thread without maps
    return rows


async def first_answer(address: str) -> None:
    """One short text request through the router (greedy, 4 tokens)."""
    import grpc

    from mmserve.v1 import api_pb2, api_pb2_grpc

    request = api_pb2.GenerateRequest(
        messages=[api_pb2.Message(role="user", parts=[api_pb2.Part(text="Say hello.")])],
        sampling=api_pb2.SamplingParams(max_tokens=4, temperature=0.0))
    async with grpc.aio.insecure_channel(address) as channel:
        async for _ in api_pb2_grpc.RouterStub(channel).Generate(request, timeout=120):
            pass


@dataclasses.dataclass
class Run:
    healthy_s: float  # launch to the "router listening" line
    cpu_s: float  # CPU seconds the stack's processes used until then
    last_stage_s: float  # launch to the last stage (decoder, encoder, llm) logging that it serves
    answered_s: float  # launch to the end of the first answer
    rows: list[tuple[str, int, float, float]]  # (name, pid, RSS MB, PSS MB) after idling


_STAGE_SERVING = re.compile(r"serving mmserve\.v1\.(Decoder|Encoder|Llm) ")


def last_stage_serving(log: str) -> float:
    """The wall-clock time at which the last stage logged "serving mmserve.v1.<Stage>"."""
    times = [datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
             for line in log.splitlines() if _STAGE_SERVING.search(line)]
    return max(times)


def one_run(model: str, port: int, idle_s: float) -> Run:
    """One start of the stack, its first answer, and its memory after idle_s."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = tempfile.TemporaryFile("w+")  # the stack's own log (INFO: the stages' "serving" lines)
    launched, start = time.time(), time.perf_counter()
    up = subprocess.Popen([sys.executable, "-m", "stack.cli", "up", "--model", model, "--port", str(port),
                           "--log-level", "INFO"], stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env)
    try:
        for line in up.stdout:
            if "router listening" in line:
                break
        else:
            log.seek(0)
            raise RuntimeError(f"mmserve up exited with {up.wait()} before it was healthy:\n{log.read()[-3000:]}")
        healthy_s = time.perf_counter() - start
        used_s = cpu_s(descendants(up.pid))
        asyncio.run(first_answer(f"127.0.0.1:{port}"))
        answered_s = time.perf_counter() - start
        time.sleep(idle_s)
        log.seek(0)
        return Run(healthy_s, used_s, last_stage_serving(log.read()) - launched, answered_s, stack_memory(up.pid))
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
        log.close()


def build_model(preset: str, out: str) -> str:
    """A tiny-model checkpoint of the preset, written by the real CLI."""
    subprocess.run([sys.executable, "-m", "stack.cli", "tiny-model", "--preset", preset, "--out", out], check=True,
                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="tiny-model preset to build when --model is not given")
    parser.add_argument("--model", default="", help="checkpoint directory (default: a fresh --preset checkpoint)")
    parser.add_argument("--runs", type=int, default=3, help="starts of the stack")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle seconds after the first answer, before "
                                                                  "memory is read")
    parser.add_argument("--port", type=int, default=0, help="router port (0: a free one)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from stack.ports import free_port

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory(prefix="mmserve-startup-") as tmp:
        model = args.model or build_model(args.preset, os.path.join(tmp, args.preset))
        runs = []
        for i in range(args.runs):
            run = one_run(model, args.port or free_port(), args.idle_s)
            runs.append(run)
            rss, pss = sum(r[2] for r in run.rows), sum(r[3] for r in run.rows)
            print(f"run {i + 1}: healthy {run.healthy_s:.2f} s ({run.cpu_s:.1f} CPU s; the last stage served at "
                  f"{run.last_stage_s:.2f} s), first answer {run.answered_s:.2f} s, idle RSS {rss:.0f} MB, "
                  f"PSS {pss:.0f} MB")
            for name, pid, r, p in sorted(run.rows, key=lambda row: -row[2]):
                print(f"  {name:<16} {pid:>8} RSS {r:7.1f} MB  PSS {p:7.1f} MB")
    figures = {"healthy s": [r.healthy_s for r in runs], "CPU s to healthy": [r.cpu_s for r in runs],
               "last stage s": [r.last_stage_s for r in runs],
               "healthy after it": [r.healthy_s - r.last_stage_s for r in runs],
               "first answer s": [r.answered_s for r in runs],
               "idle RSS MB": [sum(row[2] for row in r.rows) for r in runs],
               "idle PSS MB": [sum(row[3] for row in r.rows) for r in runs]}
    for label, values in figures.items():
        print(f"{label:<17} best {min(values):8.2f}  median {statistics.median(values):8.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other processes slow start-up down)")
    print(f"idle_pss_mb={statistics.median(figures['idle PSS MB']):.0f}")
    print(f"startup_s={statistics.median(figures['healthy s']):.2f} "
          f"idle_rss_mb={statistics.median(figures['idle RSS MB']):.0f}")

if __name__ == "__main__":
    main()
