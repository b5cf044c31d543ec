"""`make load`: runs Locust headless against a running stack, then writes the CSVs, a plot and a summary.

    python loadtest/run.py --addr 127.0.0.1:50051 --duration 60s --rate 2 --workload mixed --out loadtest/out
    python loadtest/run.py --addr router.example.com:50051 --tls-ca-file certs/ca.pem --token-file token.txt

Exit code 0 when the run completed and at least one request succeeded (failures are reported, not fatal).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `loadtest` importable

from loadtest import connection, report, workloads  # noqa: E402

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
TRACE_PREFIX = "trace:"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="router address")
    p.add_argument("--duration", default="60s", help="how long new requests arrive: 90, 90s, 2m, 1h30m")
    p.add_argument("--rate", type=float, default=2.0, help="requests/s offered (ignored by a trace)")
    p.add_argument("--workload", default="mixed", help=f"{', '.join(workloads.SHAPES)} or trace:<path.jsonl>")
    p.add_argument("--out", default=str(ROOT / "loadtest" / "out"), help="folder for the CSVs, plot and summary")
    p.add_argument("--csv", default="locust", help="file name prefix of the CSVs and the plot in --out")
    p.add_argument("--users", type=int, default=0,
                   help="Locust users, the most requests in flight (default: 10 × rate, at least 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each synthetic request generates")
    p.add_argument("--arrivals", choices=("poisson", "constant"), default="poisson")
    p.add_argument("--cache-hit-ratio", type=float, default=0.0,
                   help="share of synthetic requests that repeat an earlier one")
    p.add_argument("--request-timeout", type=float, default=120.0, help="deadline of each request, seconds")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the router to answer")
    p.add_argument("--stop-timeout", type=int, default=30,
                   help="seconds requests in flight at the end may take to finish (later ones are not counted)")
    connection.add_arguments(p)  # TLS and the bearer token, as `mmserve generate`
    args = p.parse_args(argv)
    try:
        args.connection = connection.from_args(args)
        args.duration_s = report.parse_duration(args.duration)
        if args.duration_s < 1 or args.rate <= 0 or args.max_tokens < 1 or args.users < 0:
            raise ValueError("--duration, --rate and --max-tokens must be positive")
        if args.workload.startswith(TRACE_PREFIX):
            trace = pathlib.Path(args.workload[len(TRACE_PREFIX):]).resolve()  # Locust runs from ROOT
            workloads.parse_trace(trace.read_text().splitlines(), str(trace))
            args.workload = f"{TRACE_PREFIX}{trace}"
        else:
            workloads.parse_shape(args.workload)
    except (ValueError, OSError) as err:
        p.error(str(err))
    args.users = args.users or max(4, math.ceil(10 * args.rate))
    return args


def locust_command(args: argparse.Namespace, prefix: pathlib.Path) -> list[str]:
    """The headless Locust command line (run as a subprocess: Locust monkey-patches the process with gevent)."""
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "--host", args.addr, "--users", str(args.users), "--spawn-rate", str(args.users),
            "--run-time", f"{args.duration_s}s", "--stop-timeout", str(args.stop_timeout),
            "--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html",
            "--workload", args.workload, "--rate", str(args.rate), "--max-tokens", str(args.max_tokens),
            "--arrivals", args.arrivals, "--cache-hit-ratio", str(args.cache_hit_ratio),
            "--request-timeout", str(args.request_timeout), *connection.forwarded(args)]


def wait_ready(addr: str, timeout_s: float, via: connection.Connection) -> bool:
    """Whether a gRPC channel to addr (TLS when via says so) connects within timeout_s."""
    import grpc

    with via.channel(addr, 4 * 1024 * 1024) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            return True
        except grpc.FutureTimeoutError:
            return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / args.csv
    if not wait_ready(args.addr, args.connect_timeout, args.connection):
        how = "over TLS " if args.connection.client_tls else ""
        print(f"load: no gRPC server answers {how}on {args.addr} (start one with `mmserve up`)", file=sys.stderr)
        return 2
    pace = ("at the trace's offsets" if args.workload.startswith(TRACE_PREFIX)
            else f"at {args.rate:g} req/s ({args.arrivals})")
    print(f"load: {args.workload} {pace}, {args.users} users, for {args.duration_s} s against {args.addr}; "
          f"output in {out}", flush=True)
    log_path = out / f"{args.csv}.log"
    # Startup (media generation) and the stop timeout come on top of the run time.
    limit_s = args.duration_s + args.stop_timeout + 180
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(locust_command(args, prefix), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=limit_s).returncode
        except subprocess.TimeoutExpired:
            print(f"load: Locust did not finish within {limit_s} s; its log is {log_path}", file=sys.stderr)
            return 3
    stats, failures, history = (pathlib.Path(f"{prefix}{s}.csv") for s in ("_stats", "_failures", "_stats_history"))
    # Locust exits 1 when some requests failed; anything else, or missing CSVs, means the run itself broke.
    if rc not in (0, 1) or not stats.exists() or not history.exists():
        print(f"load: Locust exited with {rc}; last lines of {log_path}:", file=sys.stderr)
        print("".join(log_path.read_text().splitlines(keepends=True)[-20:]), file=sys.stderr)
        return 4
    summary = report.summarize(stats.read_text(), failures.read_text() if failures.exists() else "", args.duration_s)
    png = pathlib.Path(f"{prefix}.png")
    report.plot(history.read_text(), png, title=f"mmserve {args.workload} {pace}")
    text = summary.format()
    (out / f"{args.csv}_summary.txt").write_text(text + "\n")
    print(text)
    print(f"\nCSVs {prefix}_*.csv, plot {png}, report {prefix}.html, log {log_path}")
    return 0 if summary.num_ok > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
