"""Reads Locust's CSVs of a load test: the summary table and the plot over time (no Locust import, no gevent)."""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import math
import pathlib
import re

METRICS = ("ttft", "tpot", "e2e")
PERCENTILES = ("50%", "90%", "99%")
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> int:
    """Seconds of a Locust time span: "90", "90s", "2m", "1h30m"; ValueError otherwise."""
    if text.isdigit():
        return int(text)
    match = _DURATION.fullmatch(text)
    if not text or not match or not any(match.groups()):
        raise ValueError(f"duration: {text!r} is not like 90, 90s, 2m or 1h30m")
    h, m, s = (int(g or 0) for g in match.groups())
    return h * 3600 + m * 60 + s


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _number(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def split_name(name: str) -> tuple[str, str]:
    """("ttft", "video") from "ttft video"."""
    metric, _, kind = name.partition(" ")
    return metric, kind


@dataclasses.dataclass
class ClassStats:
    """One request class: counts and the p50/p90/p99 of each client metric (ms)."""

    num_requests: int = 0
    num_failures: int = 0
    num_tokens: float = 0.0
    percentiles: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    router_p50: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Summary:
    """What one run achieved, from the _stats.csv and _failures.csv files."""

    duration_s: float
    classes: dict[str, ClassStats]
    failures: collections.Counter

    @property
    def num_requests(self) -> int:
        return sum(c.num_requests for c in self.classes.values())

    @property
    def num_failures(self) -> int:
        return sum(c.num_failures for c in self.classes.values())

    @property
    def num_ok(self) -> int:
        return self.num_requests - self.num_failures

    def format(self) -> str:
        """The table printed at the end of a run."""
        rate = self.num_requests / self.duration_s
        tokens = sum(c.num_tokens for c in self.classes.values())
        kinds = ", ".join(f"{k} {n}" for k, n in self.failures.most_common()) or "none"
        lines = [f"requests {self.num_requests}  ok {self.num_ok}  failed {self.num_failures} ({kinds})",
                 f"achieved {rate:.2f} req/s ({self.num_ok / self.duration_s:.2f} ok), "
                 f"{tokens / self.duration_s:.1f} completion tokens/s over {self.duration_s:g} s",
                 "",
                 f"{'class':<7}{'reqs':>6}{'fail':>6}" + "".join(f"{m + ' p50/p90/p99 ms':>26}" for m in METRICS)]
        for kind, c in sorted(self.classes.items()):
            cells = ["/".join(_ms(v) for v in c.percentiles.get(m, (math.nan,) * 3)) for m in METRICS]
            lines.append(f"{kind:<7}{c.num_requests:>6}{c.num_failures:>6}" + "".join(f"{x:>26}" for x in cells))
        stages = [f"{kind:<7}" + "  ".join(f"{stage} {_ms(v)}" for stage, v in c.router_p50.items())
                  for kind, c in sorted(self.classes.items()) if c.router_p50]
        if stages:
            lines += ["", "router stages, p50 ms (Final.timings):", *stages]
        return "\n".join(lines)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def summarize(stats_csv: str, failures_csv: str, duration_s: float) -> Summary:
    """The per-class summary: requests and failures from the e2e entries, percentiles from each metric's entry."""
    classes: dict[str, ClassStats] = collections.defaultdict(ClassStats)
    for row in _rows(stats_csv):
        metric, kind = split_name(row["Name"])
        if not kind:
            continue  # the Aggregated row mixes every metric
        c = classes[kind]
        if row["Type"] == "router":
            c.router_p50[metric] = _number(row["50%"])
        elif metric in METRICS:
            num_timed = int(row["Request Count"]) - (int(row["Failure Count"]) if metric == "e2e" else 0)
            # Failed requests carry no response time (see metrics.failed_samples).
            c.percentiles[metric] = tuple(_number(row[p]) if num_timed else math.nan for p in PERCENTILES)
            if metric == "e2e":
                c.num_requests = int(row["Request Count"])
                c.num_failures = int(row["Failure Count"])
                c.num_tokens = _number(row["Average Content Size"]) * c.num_requests
    failures = collections.Counter()
    for row in _rows(failures_csv):
        if split_name(row["Name"])[0] == "e2e":
            failures[row["Error"]] += int(row["Occurrences"])
    return Summary(duration_s, {k: c for k, c in classes.items() if c.num_requests}, failures)


def history_series(history_csv: str, window_s: int = 5) -> dict[str, dict[str, list[float]]]:
    """Per entry name, the series over time from _stats_history.csv (with --csv-full-history).

    Keys: "t" (seconds since the first row), one per percentile (Locust's percentile over about the last
    10 s; NaN where the window holds no data), "finished/s" (completions per second over the last window_s
    seconds, from the cumulative counts), "failed/s" (likewise) and "tokens" (cumulative; e2e entries: completion
    tokens).
    """
    rows = _rows(history_csv)
    t0 = min((int(r["Timestamp"]) for r in rows), default=0)
    series: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for row in rows:
        if row["Name"] == "Aggregated" or not row["Type"]:
            continue
        s = series[row["Name"]]
        s["t"].append(int(row["Timestamp"]) - t0)
        for p in PERCENTILES:
            value = _number(row[p])
            s[p].append(value if value > 0 else math.nan)  # 0 / N/A: no sample in the window
        s["count"].append(_number(row["Total Request Count"]))
        s["failures"].append(_number(row["Total Failure Count"]))
        s["tokens"].append(_number(row["Total Average Content Size"]) * s["count"][-1])
    for s in series.values():
        for total, rate in (("count", "finished/s"), ("failures", "failed/s")):
            s[rate] = _rolling_rate(s["t"], s[total], window_s)
    return series


def tokens_rate(series: list[dict[str, list[float]]], window_s: int = 5) -> tuple[list[float], list[float]]:
    """Times and completion tokens/s summed over several entries' series (each starts when its first sample did)."""
    times = sorted({t for s in series for t in s["t"]})
    totals = [0.0] * len(times)
    for s in series:
        known = dict(zip(s["t"], s["tokens"]))
        last = 0.0
        for i, t in enumerate(times):
            last = known.get(t, last)
            totals[i] += last
    return times, _rolling_rate(times, totals, window_s)


def _rolling_rate(t: list[float], totals: list[float], window_s: int) -> list[float]:
    """At each point, the growth of a cumulative total over the last window_s seconds, per second (0 before t[0])."""
    out, j = [], 0
    for i in range(len(t)):
        while t[i] - t[j] >= window_s:
            j += 1
        before = totals[j - 1] if j > 0 else 0.0
        out.append((totals[i] - before) / window_s)
    return out


def plot(history_csv: str, path: pathlib.Path, title: str = "") -> None:
    """TTFT and e2e percentiles per class, and throughput, over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = history_series(history_csv)
    kinds = sorted({split_name(n)[1] for n in series if split_name(n)[0] == "e2e"})
    colors = dict(zip(kinds, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = dict(zip(PERCENTILES, ("-", "--", ":")))
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for ax, metric in zip(axes, ("ttft", "e2e")):
        for kind in kinds:
            s = series.get(f"{metric} {kind}")
            for p in PERCENTILES if s else ():
                ax.plot(s["t"], s[p], styles[p], color=colors[kind], label=f"{kind} p{p[:-1]}")
        ax.set_ylabel(f"{metric} ms (last ~10 s)")
        ax.legend(fontsize="small", ncol=len(kinds) or 1)
        ax.grid(alpha=0.3)
    ax = axes[2]
    for kind in kinds:
        s = series[f"e2e {kind}"]
        ax.plot(s["t"], s["finished/s"], color=colors[kind], label=f"{kind} finished/s")
        if any(s["failed/s"]):
            ax.plot(s["t"], s["failed/s"], ":", color=colors[kind], label=f"{kind} failed/s")
    ax.set_ylabel("requests/s (5 s window)")
    ax.set_xlabel("seconds since start")
    ax.grid(alpha=0.3)
    tokens = ax.twinx()
    tokens.plot(*tokens_rate([series[f"e2e {k}"] for k in kinds]), color="black", alpha=0.4,
                label="completion tokens/s")
    tokens.set_ylabel("completion tokens/s")
    handles = [h for a in (ax, tokens) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize="small", ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
