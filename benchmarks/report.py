"""Results of ``benchmarks.compare`` and how they are reported: the phases of a
stack, the markdown tables, and each issue's targets with met / not met.

Issue 7 (the first side-by-side run): CPU per delivery at N = 1, 100, 1000,
p99 at N = 100, idle memory, embedded, Redis. Issue 17: the same per message
(``--publisher single``) and timed in user space, every broker across two
nodes beside the peer a user would otherwise pick, and the scale figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.stacks import Stack

__all__ = ["Idle", "Phase", "StackResult", "detail_table", "huge_table", "main_table",
           "percentiles_ms", "target_lines", "targets", "targets17"]

# issue 7 targets
T_CPU_US = {1000: 2.5, 100: 4.0, 1: 4.0}
T_P99_MS = 2.0
T_IDLE_KIB = 10.0
T_EMBEDDED_US = 8.0
T_REDIS_N1_RATIO = 10.0
T_REDIS_N1000_RATIO = 1.3
T_HUGE_CONNS = 50_000
T_HUGE_RSS_MIB = 1024.0

# issue 17 targets
T17_N1000_VS_PEER = 4.0  # N = 1000: at least 4x better than the best peer
T17_P99_MS = 1.5
T17_EMBEDDED_RATIO = 1.5
T17_IDLE_KIB = 7.0
T17_SCALE_CONNS = 20_000
T17_SCALE_RSS_MIB = 200.0
T17_BROKER_RATIO = 1.3  # Redis, NATS at N = 1000 vs memory
T17_NATS_VS_GO = 2.0


def percentiles_ms(values: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/max in ms of latencies in ns (sorted here): nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return {}

    def rank(q: float) -> float:
        k = max(1, -(-round(q * 1000) * len(ordered) // 1000))  # ceil(q * n), exactly
        return round(ordered[min(k, len(ordered)) - 1] / 1e6, 3)

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99),
            "max": round(ordered[-1] / 1e6, 3)}



@dataclass
class Phase:
    name: str
    n: int
    messages: int
    rate: float | None = None
    elapsed_s: float = 0.0
    deliveries: int = 0
    lost: int = 0
    short: int = 0
    closed: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    server_cpu_s: float = 0.0
    server_user_s: float = 0.0  # the utime part of server_cpu_s (the rest: the kernel's)
    server_sched_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # kernel receive stamps
    samples: int = 0
    timed_out: bool = False
    publisher: str = "batched"  # batched: 32 frames a write; single: one frame a write
    user_latency_ms: dict[str, float] = field(default_factory=dict)  # read by the client
    stamped: bool = False  # latency_ms is from the kernel's receive timestamps
    publisher_cpu_s: float = 0.0  # the controller process: publishers and pacing
    channels: int = 1
    placement: str = ""  # --workers: where the publisher and the subscribers landed
    attempts: int = 1  # runs made to keep this one (--repeat, --max-other, --rounds)
    runs: list[dict[str, Any]] = field(default_factory=list)  # every run's figures

    def summary(self) -> dict[str, Any]:
        """The figures of this run, kept beside the best one's."""
        return {"us": round(self.us, 3), "per_s": round(self.per_s),
                "other_cpu_percent": round(self.pct(self.other_cpu_s), 1),
                "loadgen_cpu_percent": round(self.pct(self.loadgen_cpu_s), 1),
                "user_latency_ms": self.user_latency_ms,
                "latency_ms": self.latency_ms if self.stamped else {}, "lost": self.lost}

    @property
    def per_s(self) -> float:
        return (self.deliveries - self.lost) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def us(self) -> float:
        done = self.deliveries - self.lost
        return self.server_cpu_s * 1e6 / done if done > 0 else 0.0

    @property
    def us_user(self) -> float:
        """The user-space (utime) part of :attr:`us`."""
        done = self.deliveries - self.lost
        return self.server_user_s * 1e6 / done if done > 0 else 0.0

    def pct(self, cpu: float) -> float:
        return 100 * cpu / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "subscribers": self.n, "messages": self.messages,
            "rate": self.rate, "elapsed_s": round(self.elapsed_s, 4),
            "deliveries": self.deliveries, "lost": self.lost, "short_subscribers": self.short,
            "closed": self.closed, "errors": self.errors[:10],
            "deliveries_per_s": round(self.per_s, 1),
            "server_cpu_s": round(self.server_cpu_s, 3),
            "server_cpu_us_per_delivery": round(self.us, 3),
            "server_cpu_percent": round(self.pct(self.server_cpu_s), 1),
            "server_user_us_per_delivery": round(self.us_user, 3),
            "server_schedstat_us_per_delivery": round(
                self.server_sched_s * 1e6 / (self.deliveries - self.lost), 3)
            if self.deliveries > self.lost else 0.0,
            "loadgen_cpu_s": round(self.loadgen_cpu_s, 3),
            "loadgen_cpu_percent": round(self.pct(self.loadgen_cpu_s), 1),
            "loadgen_us_per_delivery": round(self.loadgen_cpu_s * 1e6 / self.deliveries, 3)
            if self.deliveries else 0.0,
            "broker_cpu_s": round(self.broker_cpu_s, 3),
            "other_cpu_s": round(self.other_cpu_s, 3),
            "other_cpu_percent": round(self.pct(self.other_cpu_s), 1),
            "publisher_cpu_s": round(self.publisher_cpu_s, 3),
            "publisher_cpu_percent": round(self.pct(self.publisher_cpu_s), 1),
            "subscribers_cpu_percent": round(
                self.pct(self.loadgen_cpu_s - self.publisher_cpu_s), 1),
            "latency_ms": self.latency_ms if self.stamped else {},
            "user_latency_ms": self.user_latency_ms, "latency_samples": self.samples,
            "timed_out": self.timed_out, "publisher": self.publisher,
            "channels": self.channels, "placement": self.placement,
            "attempts": self.attempts, "runs": self.runs,
        }


@dataclass
class Idle:
    connections: int
    opened: int = 0
    failed: int = 0
    seconds: float = 0.0
    rss0_kib: tuple[int, int] = (0, 0)
    rss1_kib: tuple[int, int] = (0, 0)
    server_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    nofile: tuple[int, int] = (0, 0)  # RLIMIT_NOFILE (soft, hard) after raising it
    nofile_before: tuple[int, int] = (0, 0)
    processes: int = 1  # the server's process tree (--workers: supervisor and workers)
    note: str = ""

    @property
    def per_s(self) -> float:
        return self.opened / self.seconds if self.seconds > 0 else 0.0

    @property
    def kib_per_conn(self) -> float:
        return (self.rss1_kib[1] - self.rss0_kib[1]) / self.opened if self.opened else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections, "opened": self.opened, "failed": self.failed,
            "seconds": round(self.seconds, 3), "connections_per_s": round(self.per_s, 1),
            "rss_before_kib": self.rss0_kib[0], "rss_after_kib": self.rss1_kib[0],
            "rss_anon_before_kib": self.rss0_kib[1], "rss_anon_after_kib": self.rss1_kib[1],
            "rss_anon_kib_per_connection": round(self.kib_per_conn, 2),
            "rss_kib_per_connection": round((self.rss1_kib[0] - self.rss0_kib[0])
                                            / self.opened, 2) if self.opened else 0.0,
            "server_cpu_us_per_connection": round(self.server_cpu_s * 1e6 / self.opened, 1)
            if self.opened else 0.0,
            "loadgen_cpu_s": round(self.loadgen_cpu_s, 3),
            "other_cpu_s": round(self.other_cpu_s, 3), "errors": self.errors,
            "nofile": list(self.nofile), "nofile_before": list(self.nofile_before),
            "processes": self.processes, "note": self.note,
        }


@dataclass
class StackResult:
    stack: Stack
    phases: list[Phase] = field(default_factory=list)
    idle: Idle | None = None
    huge: Idle | None = None
    errors: list[str] = field(default_factory=list)
    channels: list[Phase] = field(default_factory=list)  # the many-channels scenario

    def throughput(self, n: int, publisher: str | None = None) -> Phase | None:
        """The throughput phase at N = ``n`` with that publisher (default: the
        first one run, ``--publisher``'s first mode)."""
        return next((p for p in self.phases if p.name == "throughput" and p.n == n
                     and publisher in (None, p.publisher)), None)

    def latency(self) -> Phase | None:
        return next((p for p in self.phases if p.name == "latency"), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack.key, "label": self.stack.label, "peer": self.stack.peer,
            "phases": [p.to_dict() for p in self.phases],
            "idle": self.idle.to_dict() if self.idle else None,
            "huge": self.huge.to_dict() if self.huge else None,
            "channels": [p.to_dict() for p in self.channels],
            "errors": self.errors,
        }



# -- reporting --------------------------------------------------------------------------


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None or value == 0 else fmt.format(value)


def main_table(results: Sequence[StackResult]) -> str:
    head = ("| stack | server CPU µs per delivery (N = 1000) | deliveries/s seen (N = 1000) | "
            "idle KiB/conn | p99 ms at N=100, 200 msg/s (p50) | µs/delivery N = 1 | "
            "µs/delivery N = 100 | connects/s | load-gen CPU % | other CPU % | lost |")
    rows = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in results:
        if not (r.phases or r.idle or r.errors):
            continue  # e.g. only --huge or --channels ran for it
        big = r.throughput(1000)
        label = r.stack.label
        if big is None:
            sizes = [p.n for p in r.phases if p.name == "throughput"]
            big = r.throughput(max(sizes)) if sizes else None
            if big is not None:
                label += f", N = {big.n}"
        lat = r.latency()
        p99 = (f"{lat.latency_ms['p99']:.2f} ({lat.latency_ms['p50']:.2f})"
               if lat and lat.samples else "-")
        n1, n100 = r.throughput(1), r.throughput(100)
        phases = [p for p in r.phases if p.name != "warmup"]
        lost: int | str = sum(p.lost for p in phases)
        if any(p.timed_out for p in phases):
            lost = f"{lost} (timed out)"
        lg = max((p.pct(p.loadgen_cpu_s) for p in phases if p.name == "throughput"), default=0)
        other = max((p.pct(p.other_cpu_s) for p in phases), default=0)
        idle_kib = _f(r.idle.kib_per_conn, "{:.1f}") if r.idle and r.idle.opened else "-"
        conn_s = _f(r.idle.per_s, "{:,.0f}") if r.idle and r.idle.opened else "-"
        if r.errors and not phases:
            label += " (error)"
        rows.append(
            f"| {label} | {_f(big.us if big else None)} | "
            f"{_f(big.per_s if big else None, '{:,.0f}')} | {idle_kib} | {p99} | "
            f"{_f(n1.us if n1 else None)} | {_f(n100.us if n100 else None)} | {conn_s} | "
            f"{lg:.0f} | {other:.0f} | {lost if phases else '-'} |")
    return "\n".join(rows)


def _lat(ms: dict[str, float]) -> str:
    return f"{ms['p50']:.2f} / {ms['p99']:.2f}" if ms else "-"


def _lost(p: Phase) -> str:
    return f"{p.lost}{' (timed out)' if p.timed_out else ''}"


def detail_table(results: Sequence[StackResult]) -> str:
    head = ("| stack | phase | publisher | N | messages | deliveries/s | server µs/delivery | "
            "of which user space | server CPU % | load-gen CPU %: subscribers + publisher | "
            "broker CPU % | other CPU % | p50 / p99 ms, user space | p50 / p99 ms, kernel | "
            "lost | runs |")
    rows = [head, "|---|---|---|" + "---:|" * (head.count("|") - 4)]
    for r in results:
        for p in [*r.phases, *r.channels]:
            rate = f" @{p.rate:g}/s" if p.rate else ""
            name = p.name + (f", {p.channels} channels" if p.channels > 1 else "")
            rows.append(
                f"| {r.stack.key} | {name}{rate} | {p.publisher} | {p.n} | {p.messages} | "
                f"{p.per_s:,.0f} | {p.us:.2f} | {p.us_user:.2f} | {p.pct(p.server_cpu_s):.0f} | "
                f"{p.pct(p.loadgen_cpu_s - p.publisher_cpu_s):.0f} + "
                f"{p.pct(p.publisher_cpu_s):.0f} | {p.pct(p.broker_cpu_s):.0f} | "
                f"{p.pct(p.other_cpu_s):.0f} | {_lat(p.user_latency_ms)} | "
                f"{_lat(p.latency_ms) if p.stamped else '-'} | {_lost(p)} | {p.attempts} |")
    return "\n".join(rows)


def per_message_table(results: Sequence[StackResult]) -> str:
    """Issue 17: the same stacks per batch and per message, latency timed both ways."""
    head = ("| stack | µs/delivery N = 1, batched | N = 1, single | N = 1000, batched | "
            "N = 1000, single | deliveries/s N = 1000, single | p50 / p99 ms user space "
            "(N = 100, 200/s) | p50 / p99 ms kernel | idle KiB/conn | "
            "load-gen CPU % N = 1 single: subscribers + publisher | lost |")
    rows = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in results:
        if r.stack.nodes > 1 or r.stack.workers > 1 or r.stack.kind == "nats":
            continue
        cells = [r.throughput(n, mode) for n in (1, 1000) for mode in ("batched", "single")]
        lat = r.latency()
        if not any(cells) and lat is None:
            continue
        big = r.throughput(1000, "single")
        one = r.throughput(1, "single")
        lg = (f"{one.pct(one.loadgen_cpu_s - one.publisher_cpu_s):.0f} + "
              f"{one.pct(one.publisher_cpu_s):.0f}" if one else "-")
        phases = [p for p in r.phases if p.name != "warmup"]
        rows.append(
            f"| {r.stack.label} | " + " | ".join(_f(c.us if c else None) for c in cells)
            + f" | {_f(big.per_s if big else None, '{:,.0f}')} | "
            f"{_lat(lat.user_latency_ms) if lat else '-'} | "
            f"{_lat(lat.latency_ms) if lat and lat.stamped else '-'} | "
            f"{_f(r.idle.kib_per_conn if r.idle and r.idle.opened else None, '{:.1f}')} | "
            f"{lg} | {sum(p.lost for p in phases)} |")
    return "\n".join(rows)


def _is_broker_row(r: StackResult) -> bool:
    return (r.stack.key == "tidings" or r.stack.nodes > 1 or r.stack.workers > 1
            or r.stack.kind == "nats")


def broker_table(results: Sequence[StackResult]) -> str:
    """Issue 17: every broker the same way (two nodes, publisher on the first)."""
    head = ("| stack | setup | N = 1: deliveries/s (= publications/s) | N = 1: server µs | "
            "N = 1: broker µs | N = 1000: server µs/delivery | N = 1000: broker µs/delivery | "
            "N = 1000: deliveries/s | p50 / p99 ms across nodes, user space (N = 100, 200/s) | "
            "kernel | lost | note |")
    rows = [head, "|---|---|" + "---:|" * (head.count("|") - 4) + "---|"]
    for r in results:
        if not _is_broker_row(r):
            continue
        one, big, lat = r.throughput(1), r.throughput(1000), r.latency()
        if one is None and big is None and lat is None:
            continue

        def broker_us(p: Phase | None) -> str:
            done = p.deliveries - p.lost if p else 0
            return f"{p.broker_cpu_s * 1e6 / done:.2f}" if p and done and p.broker_cpu_s else "-"

        phases = [p for p in r.phases if p.name != "warmup"]
        notes = sorted({p.placement for p in phases if p.placement})
        setup = r.stack.setup + (f" on {r.stack.broker}" if r.stack.broker else "")
        rows.append(
            f"| {r.stack.label} | {setup} | {_f(one.per_s if one else None, '{:,.0f}')} | "
            f"{_f(one.us if one else None)} | {broker_us(one)} | {_f(big.us if big else None)} | "
            f"{broker_us(big)} | {_f(big.per_s if big else None, '{:,.0f}')} | "
            f"{_lat(lat.user_latency_ms) if lat else '-'} | "
            f"{_lat(lat.latency_ms) if lat and lat.stamped else '-'} | "
            f"{sum(p.lost for p in phases)} | {'; '.join(notes)} |")
    return "\n".join(rows)


def channels_table(results: Sequence[StackResult]) -> str:
    head = ("| stack | phase | publisher | channels | subscribers | publications/s | "
            "deliveries/s | server µs/delivery | p50 / p99 ms user space | "
            "load-gen CPU %: subscribers + publishers | other CPU % | lost |")
    rows = [head, "|---|---|---|" + "---:|" * (head.count("|") - 4)]
    for r in results:
        for p in r.channels:
            rate = f" @{p.rate * p.channels:g}/s" if p.rate else ""
            pubs = p.messages * p.channels / p.elapsed_s if p.elapsed_s else 0
            rows.append(
                f"| {r.stack.key} | {p.name}{rate} | {p.publisher} | {p.channels} | {p.n:,} | "
                f"{pubs:,.0f} | {p.per_s:,.0f} | {p.us:.2f} | {_lat(p.user_latency_ms)} | "
                f"{p.pct(p.loadgen_cpu_s - p.publisher_cpu_s):.0f} + "
                f"{p.pct(p.publisher_cpu_s):.0f} | {p.pct(p.other_cpu_s):.0f} | {_lost(p)} |")
    return "\n".join(rows)


def huge_table(results: Sequence[StackResult]) -> str:
    rows = ["| stack | connections opened (asked) | connects/s | server RSS MiB (VmRSS) | "
            "RssAnon MiB | RssAnon KiB/conn | server CPU µs/conn | processes | "
            "RLIMIT_NOFILE (before) | note |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        h = r.huge
        if h is None:
            continue
        d = h.to_dict()
        rows.append(f"| {r.stack.key} | {h.opened:,} ({h.connections:,}) | {h.per_s:,.0f} | "
                    f"{h.rss1_kib[0] / 1024:.0f} | {h.rss1_kib[1] / 1024:.0f} | "
                    f"{h.kib_per_conn:.1f} | {d['server_cpu_us_per_connection']} | "
                    f"{h.processes} | {h.nofile[0]} ({h.nofile_before[0]}) | {h.note or ''} |")
    return "\n".join(rows)


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def targets(results: Sequence[StackResult]) -> list[dict[str, Any]]:
    """Each issue 7 target that this run measured: met or not, with the ratio."""
    by = {r.stack.key: r for r in results}
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str, ok: bool, ratio: str) -> None:
        out.append({"target": target, "measured": measured, "met": ok, "ratio": ratio})

    peers = [r for r in results if r.stack.peer and r.throughput(1000)]
    best = min(peers, key=lambda r: r.throughput(1000).us) if peers else None  # type: ignore[union-attr]
    t = by.get("tidings")
    if t is not None:
        for n in (1000, 100, 1):
            p = t.throughput(n)
            if p is None or not p.us:
                continue
            goal = T_CPU_US[n]
            extra = ""
            if n == 1000 and best is not None:
                b = best.throughput(1000)
                assert b is not None
                extra = (f"; {b.us / p.us:.1f}x better than the best peer "
                         f"({best.stack.key}, {b.us:.2f} µs; the target asks 2.6x)")
            add(f"`tidings serve` N = {n}: ≤ {goal:g} µs server CPU per delivery, lossless",
                f"{p.us:.2f} µs, lost {p.lost}", p.us <= goal and not p.lost,
                f"{p.us / goal:.2f}x the target{extra}")
        lat = t.latency()
        if lat is not None and lat.samples:
            p99 = lat.latency_ms["p99"]
            peer_p99 = [(r.latency().latency_ms["p99"], r.stack.key) for r in results  # type: ignore[union-attr]
                        if r.stack.peer and r.latency() and r.latency().samples]  # type: ignore[union-attr]
            extra = ""
            if peer_p99:
                bp, bk = min(peer_p99)
                extra = f"; best peer {bk} {bp:.2f} ms"
            add(f"latency at N = 100, {lat.rate:g} msg/s: p99 ≤ {T_P99_MS:g} ms",
                f"p99 {p99:.2f} ms (p50 {lat.latency_ms['p50']:.2f})",
                p99 <= T_P99_MS and not lat.lost, f"{p99 / T_P99_MS:.2f}x the target{extra}")
        if t.idle is not None and t.idle.opened:
            kib = t.idle.kib_per_conn
            peer_kib = [(r.idle.kib_per_conn, r.stack.key) for r in results
                        if r.stack.peer and r.idle and r.idle.opened]
            extra = ""
            if peer_kib:
                low, name = min(peer_kib)
                extra = f"; best peer {name} {low:.1f} KiB"
            add(f"idle connections: ≤ {T_IDLE_KIB:g} KiB each ({t.idle.opened:,} subscribed)",
                f"{kib:.1f} KiB/conn", kib <= T_IDLE_KIB,
                f"{kib / T_IDLE_KIB:.2f}x the target{extra}")
    for key, how in (("tidings-fastapi-direct", "uvicorn --ws tidings.server.wsproto:"
                                                "DirectWSProtocol"),
                     ("tidings-fastapi", "uvicorn's default websocket protocol")):
        e = by.get(key)
        if e is not None and (p := e.throughput(1000)) is not None and p.us:
            add(f"embedded in FastAPI under uvicorn: ≤ {T_EMBEDDED_US:g} µs per delivery, "
                f"N = 1000 ({how})",
                f"{p.us:.2f} µs, lost {p.lost}", p.us <= T_EMBEDDED_US and not p.lost,
                f"{p.us / T_EMBEDDED_US:.2f}x the target")
    tr, br = by.get("tidings-redis"), by.get("broadcaster-redis")
    if tr is not None and br is not None:
        a, b = tr.throughput(1), br.throughput(1)
        if a is not None and b is not None and a.per_s and b.per_s:
            ratio = a.per_s / b.per_s
            add(f"Redis broker, N = 1: ≥ {T_REDIS_N1_RATIO:g}x the throughput of broadcaster "
                "with Redis",
                f"{a.per_s:,.0f} vs {b.per_s:,.0f} deliveries/s",
                ratio >= T_REDIS_N1_RATIO and not a.lost, f"{ratio:.1f}x")
    if tr is not None and t is not None:
        a, b = tr.throughput(1000), t.throughput(1000)
        if a is not None and b is not None and a.us and b.us:
            ratio = a.us / b.us
            add(f"Redis broker, N = 1000: ≤ {T_REDIS_N1000_RATIO:g}x the per-delivery cost on "
                "memory", f"{a.us:.2f} vs {b.us:.2f} µs", ratio <= T_REDIS_N1000_RATIO
                and not a.lost, f"{ratio:.2f}x")
    h = t.huge if t is not None else None
    if h is not None:
        mib = h.rss1_kib[0] / 1024
        measured = f"{h.opened:,} connections, {mib:.0f} MiB RSS, {h.per_s:,.0f} connects/s"
        if 0 < h.opened < T_HUGE_CONNS:
            per = (h.rss1_kib[0] - h.rss0_kib[0]) / h.opened
            at = (h.rss0_kib[0] + per * T_HUGE_CONNS) / 1024
            measured += f"; {per:.1f} KiB/conn would make {at:,.0f} MiB at {T_HUGE_CONNS:,}"
        add(f"{T_HUGE_CONNS:,} concurrent idle connections, ≤ {T_HUGE_RSS_MIB:g} MiB RSS",
            measured,
            h.opened >= T_HUGE_CONNS and mib <= T_HUGE_RSS_MIB,
            f"{mib / T_HUGE_RSS_MIB:.2f}x the RSS budget"
            + (f" with {h.opened / T_HUGE_CONNS:.0%} of the connections"
               if h.opened < T_HUGE_CONNS else ""))
    return out


def target_lines(items: Sequence[dict[str, Any]]) -> list[str]:
    return [f"- {i['target']}: {_verdict(i['met'])} ({i['measured']}; {i['ratio']})"
            for i in items]




def _best_peer(results: Sequence[StackResult], n: int, mode: str | None
               ) -> tuple[StackResult, Phase] | None:
    peers = [(r, p) for r in results if r.stack.peer and r.stack.nodes == 1
             and (p := r.throughput(n, mode)) is not None and p.us and not p.lost]
    return min(peers, key=lambda rp: rp[1].us) if peers else None


def _total_us(p: Phase) -> float:
    """Server and broker CPU per delivery."""
    done = p.deliveries - p.lost
    return (p.server_cpu_s + p.broker_cpu_s) * 1e6 / done if done > 0 else 0.0


Target = dict[str, Any]


def _item(target: str, measured: str, ok: bool, ratio: str) -> Target:
    return {"target": target, "measured": measured, "met": ok, "ratio": ratio}


def _t17_cpu(t: StackResult, picows: StackResult | None,
             results: Sequence[StackResult]) -> list[Target]:
    out: list[Target] = []
    modes = [m for m in ("single", "batched") if any(p.publisher == m for p in t.phases)]
    for mode in modes:
        a = t.throughput(1, mode)
        b = picows.throughput(1, mode) if picows is not None else None
        if a is not None and b is not None and a.us and b.us:
            out.append(_item(f"N = 1, {mode} publisher: server CPU per delivery ≤ picows's",
                             f"{a.us:.2f} vs {b.us:.2f} µs, lost {a.lost}",
                             a.us <= b.us and not a.lost, f"{a.us / b.us:.2f}x picows"))
    for mode in modes:
        big = t.throughput(1000, mode)
        best = _best_peer(results, 1000, mode)
        if big is not None and big.us and best is not None:
            better = best[1].us / big.us
            out.append(_item(
                f"N = 1000, {mode} publisher: ≥ {T17_N1000_VS_PEER:g}x better than the best peer",
                f"{big.us:.2f} µs vs {best[0].stack.key} {best[1].us:.2f} µs",
                better >= T17_N1000_VS_PEER and not big.lost, f"{better:.1f}x"))
    return out


def _t17_latency(t: StackResult, picows: StackResult | None) -> list[Target]:
    lat = t.latency()
    if lat is None or not lat.user_latency_ms:
        return []
    u = lat.user_latency_ms
    measured = f"p50 {u['p50']:.2f} ms, p99 {u['p99']:.2f} ms (user space)"
    ok = u["p99"] <= T17_P99_MS and not lat.lost
    ratio = f"p99 {u['p99'] / T17_P99_MS:.2f}x the 1.5 ms budget"
    plat = picows.latency() if picows is not None else None
    if plat is not None and plat.user_latency_ms:
        pu = plat.user_latency_ms
        measured += f"; picows p50 {pu['p50']:.2f}, p99 {pu['p99']:.2f}"
        ok = ok and u["p50"] <= pu["p50"] and u["p99"] <= pu["p99"]
        ratio += f"; {u['p50'] / pu['p50']:.2f}x / {u['p99'] / pu['p99']:.2f}x picows"
    return [_item(f"N = 100, {lat.rate:g} msg/s, user-space timing: p50 and p99 ≤ picows's, "
                  f"p99 ≤ {T17_P99_MS:g} ms", measured, ok, ratio)]


def _t17_embedded(t: StackResult, e: StackResult | None) -> list[Target]:
    if e is None:
        return []
    worst: list[tuple[float, str]] = []
    for p in t.phases:
        q = e.throughput(p.n, p.publisher) if p.name == "throughput" else None
        if q is not None and p.us and q.us:
            worst.append((q.us / p.us, f"N = {p.n} {p.publisher}: {q.us:.2f} vs {p.us:.2f} µs"))
    el, tl = e.latency(), t.latency()
    if el is not None and tl is not None and el.user_latency_ms and tl.user_latency_ms:
        for name in ("p50", "p99"):
            worst.append((el.user_latency_ms[name] / tl.user_latency_ms[name],
                          f"{name} {el.user_latency_ms[name]:.2f} vs "
                          f"{tl.user_latency_ms[name]:.2f} ms"))
    if not worst:
        return []
    ratio, what = max(worst)
    return [_item(f"embedded (uvicorn + DirectWSProtocol) within {T17_EMBEDDED_RATIO:g}x of "
                  "`tidings serve` on every scenario", f"worst: {what}",
                  ratio <= T17_EMBEDDED_RATIO, f"{ratio:.2f}x")]


def _t17_scale(results: Sequence[StackResult]) -> list[Target]:
    out: list[Target] = []
    for r in results:
        h = r.huge
        if h is None or not h.opened:
            continue
        mib = h.rss1_kib[0] / 1024
        measured = (f"{h.opened:,} connections in {mib:.0f} MiB VmRSS "
                    f"({h.rss1_kib[1] / 1024:.0f} MiB anonymous), {h.per_s:,.0f} connects/s")
        ok = h.opened >= T17_SCALE_CONNS and mib <= T17_SCALE_RSS_MIB
        if h.opened < T17_SCALE_CONNS:
            per = (h.rss1_kib[0] - h.rss0_kib[0]) / h.opened
            at = (h.rss0_kib[0] + per * T17_SCALE_CONNS) / 1024
            measured += f"; {per:.1f} KiB each would make {at:.0f} MiB at {T17_SCALE_CONNS:,}"
            # stopped by RLIMIT_NOFILE within 1 %: judged on the extrapolation, and said so
            capped = h.note.startswith("RLIMIT_NOFILE") and h.opened >= 0.99 * T17_SCALE_CONNS
            ok = capped and at <= T17_SCALE_RSS_MIB and not h.failed
            mib = at if capped else mib
        out.append(_item(
            f"{r.stack.key}: {T17_SCALE_CONNS:,} connections in ≤ {T17_SCALE_RSS_MIB:g} MiB",
            measured, ok, f"{mib / T17_SCALE_RSS_MIB:.2f}x the budget"
            + (f" (extrapolated: the fd limit stopped it at {h.opened:,})"
               if h.opened < T17_SCALE_CONNS else "")))
    return out


def _t17_brokers(by: dict[str, StackResult]) -> list[Target]:
    out: list[Target] = []
    t = by.get("tidings")
    mem = t.throughput(1000) if t is not None else None
    for key in ("tidings-redis-2n", "tidings-nats-2n"):
        res = by.get(key)
        p = res.throughput(1000) if res is not None else None
        if mem is None or not mem.us or p is None or not p.us:
            continue
        out.append(_item(
            f"{key}: N = 1000 per delivery ≤ {T17_BROKER_RATIO:g}x memory",
            f"{p.us:.2f} µs (both nodes; the broker "
            f"{p.broker_cpu_s * 1e6 / max(1, p.deliveries):.2f} µs more) vs {mem.us:.2f} µs",
            p.us / mem.us <= T17_BROKER_RATIO and not p.lost, f"{p.us / mem.us:.2f}x"))
    tn, go = by.get("tidings-nats-2n"), by.get("nats-ws")
    for n in (1000, 1):
        a = tn.throughput(n) if tn is not None else None
        b = go.throughput(n) if go is not None else None
        if a is None or b is None or not a.us or not b.us:
            continue
        ratio = _total_us(a) / _total_us(b)
        out.append(_item(
            f"N = {n}: tidings on NATS within {T17_NATS_VS_GO:g}x of nats-server's own "
            "websocket per delivery",
            f"{_total_us(a):.2f} µs (nodes {a.us:.2f} + nats-server) vs {_total_us(b):.2f} µs",
            ratio <= T17_NATS_VS_GO and not a.lost, f"{ratio:.2f}x"))
    return out


def targets17(results: Sequence[StackResult]) -> list[Target]:
    """Each issue 17 target this run measured: met or not, with the ratio."""
    by = {r.stack.key: r for r in results}
    out: list[Target] = []
    t, picows = by.get("tidings"), by.get("picows")
    if t is not None:
        out += _t17_cpu(t, picows, results)
        out += _t17_latency(t, picows)
        out += _t17_embedded(t, by.get("tidings-fastapi-direct"))
        if t.idle is not None and t.idle.opened:
            kib = t.idle.kib_per_conn
            out.append(_item(f"idle memory ≤ {T17_IDLE_KIB:g} KiB per connection "
                             f"({t.idle.opened:,})", f"{kib:.2f} KiB", kib <= T17_IDLE_KIB,
                             f"{kib / T17_IDLE_KIB:.2f}x"))
    return out + _t17_scale(results) + _t17_brokers(by)
