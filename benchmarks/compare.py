"""tidings side by side with its peers and on every broker, in one run on one
machine (issues 7 and 17).

Every stack (``benchmarks/stacks.py``) is a server started here as a
subprocess on a free port: the peer servers of ``benchmarks/peers/`` (picows, a
bare ``websockets`` server with ``websockets.broadcast``, FastAPI + uvicorn with
a loop of ``send_text``, FastAPI + encode/broadcaster on memory, Redis and
PostgreSQL, fastapi-distributed-websocket, python-socketio), nats-server's own
websocket listener, and tidings itself (``tidings serve`` on memory, on
``--workers 2`` and on two nodes of each broker; tidings embedded in the
FastAPI app of ``examples/fastapi_app.py`` under uvicorn). One load generator
(``benchmarks/loadgen.py``: bare asyncio websocket clients that count frames
and parse a sample) drives them all:

- **fan-out** at N = 1, 100, 1000 subscribers of one channel (subscribers
  added between the sizes): a warm-up, then ~100-byte JSON messages at full
  speed from one publisher, ``--publisher batched`` (32 frames a write, the
  default), ``single`` (one frame a write, a turn of the loop between: a
  producer emitting messages as they happen) or ``both``. Server CPU per
  delivery is the utime+stime of the server processes (and their children)
  from ``/proc/<pid>/stat`` over the phase, divided by the deliveries;
  deliveries/s is N*M over first publish -> last frame received. Delivery must
  be lossless: each subscriber counts its frames and checks the ``seq`` of a
  sample; the publisher stays at most ``--max-ahead`` messages ahead of the
  slowest subscriber.
- **latency** at N = 100, 200 msg/s: p50/p99 of publish -> receive, every frame
  of the 99 subscribers added for N = 100 timed twice: by the kernel's receive
  timestamp (``SO_TIMESTAMPNS``) and in user space, when the client's code
  reads it (``perf_counter_ns`` against the one in the payload).
- **brokers** (``--stacks brokers``): two nodes on one broker (publisher on
  the first, subscribers on the second), ``--workers 2`` for ipc, N = 1 and
  1000 and the cross-node latency, beside broadcaster on Redis and PostgreSQL
  and nats-server's own websocket (the Go ceiling); the broker's CPU is
  reported beside the servers'.
- **idle memory** and **connect rate**: on a fresh server, 2,000 subscribed idle
  connections; RssAnon growth per connection and connections/s while opening them.
- ``--huge``: many idle connections to ``tidings serve`` (``--huge-connections``,
  default 50,000), client sockets spread over 127.0.0.x source addresses,
  RLIMIT_NOFILE raised as far as the machine allows; RSS and connect rate.
- ``--channels C``: C channels x ``--channel-subscribers`` each, fed by
  ``--publishers`` native publishers (each its share of the channels): delivery
  throughput and user-space latency.

Reported besides: the load generator's CPU (subscriber processes, and the
publisher on its own) and the CPU the rest of the machine used meanwhile
("other CPU", from ``/proc/stat``). Linux only.

    python -m benchmarks.compare [--quick] [--stacks KEY|GROUP ...] [--subscribers N ...]
                                 [--publisher batched|single|both] [--huge]
                                 [--channels 100] [--repeat K] [--json FILE]

Progress goes to stderr, markdown tables and the issues' targets to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from benchmarks.fanout import Progress, machine_facts, system_cpu_seconds
from benchmarks.loadgen import loop_name, raise_nofile, run_fast
from benchmarks.procfs import proc_tree, tree_cpu_seconds, tree_rss_kib
from benchmarks.report import (
    T_HUGE_CONNS,
    Idle,
    Phase,
    StackResult,
    broker_table,
    channels_table,
    detail_table,
    huge_table,
    main_table,
    per_message_table,
    target_lines,
    targets,
    targets17,
)
from benchmarks.session import Session
from benchmarks.stacks import (
    GROUPS,
    STACKS,
    Stack,
    broker_pids,
    channel_steps,
    cleanup,
    native_publish,
)

__all__ = ["main"]

PUBLISHERS = {"batched": ("batched",), "single": ("single",), "both": ("batched", "single")}
FD_MARGIN = 40  # descriptors a server needs besides its connections


# -- scenarios --------------------------------------------------------------------------


def messages_for(opts: argparse.Namespace, n: int) -> int:
    """Messages of a throughput phase: enough that even the fastest stack runs for
    about ``--max-seconds`` (the publisher stops at that time cap), so that the
    10 ms ticks of utime+stime stay well under 1 % of the server's CPU time."""
    budget = int(1_500_000 * opts.max_seconds)
    return max(100, min(100_000, budget // n))


async def fanout(stack: Stack, opts: argparse.Namespace, progress: Progress,
                 res: StackResult) -> None:
    sizes = sorted(set(s for s in stack.sizes if s in opts.subscribers))
    want_latency = opts.latency_seconds > 0 and 100 in opts.subscribers
    steps = sorted(set(sizes) | ({100} if want_latency else set()))
    if not steps:
        return
    session = Session(stack, opts, progress)
    try:
        await session.start()
        for n in steps:
            # the latency phase times the subscribers added for N = 100 by the
            # kernel's receive time and in user space (the N = 1 one reads through
            # uvloop: its phase is not slowed by the Python read path; not timed)
            await session.connect(n - session.n, f"{stack.key} connect N={n}",
                                  stamped=want_latency and n == 100
                                  and opts.latency_read == "stamped")
            if session.n < n:
                raise RuntimeError(f"only {session.n} of {n} subscribers connected")
            pub = session.pub
            if pub is None or not pub.alive:
                if pub is not None:  # e.g. a ping timeout after an overload
                    res.errors.append(f"N={n}: publisher reopened, the server had closed it "
                                      f"({pub.close_code})")
                    session.drop_publishers()
                await session.open_publisher()
            placement = ""
            if stack.workers > 1:
                placement = (await session.publisher_off_subscribers() if n == 1
                             else session.placement_note())
                progress.note(f"  {stack.key} N={n}: {placement}")
            warm = await session.phase("warmup", opts.warmup, warmup=True)
            if warm.short or warm.timed_out:
                raise RuntimeError(f"warm-up: {warm.short} subscribers did not get every "
                                   f"message ({warm.errors[:2]})")
            if n in sizes:
                for mode in opts.publisher_modes:
                    session.publisher = mode
                    phase = await best_of(opts, partial(
                        session.phase, "throughput", messages_for(opts, n),
                        max_s=opts.max_seconds))
                    phase.placement = placement
                    res.phases.append(phase)
            if n == 100 and want_latency:
                rate = opts.rate
                phase = await best_of(opts, partial(
                    session.phase, "latency", max(1, int(rate * opts.latency_seconds)),
                    rate=rate, sample=1, latency=True))
                phase.placement = placement
                res.phases.append(phase)
    except Exception as exc:
        res.errors.append(f"fan-out: {type(exc).__name__}: {exc}")
        progress.note(f"  {stack.key}: fan-out error: {exc}")
    finally:
        await session.close()
        await asyncio.to_thread(cleanup, stack, session.tag)


async def best_of(opts: argparse.Namespace, run: Callable[[], Awaitable[Phase]]) -> Phase:
    """Run a phase ``--repeat`` times and keep the best run (:func:`pick`). On a
    shared machine, a run during which the rest of the machine took more than
    ``--max-other`` % of a CPU does not count: up to ``--retries`` more runs are
    made to get ``--repeat`` that do."""
    runs: list[Phase] = []
    while True:
        runs.append(await run())
        calm = [p for p in runs if p.pct(p.other_cpu_s) <= opts.max_other]
        if len(calm) >= opts.repeat or len(runs) >= opts.repeat + opts.retries:
            break
    return pick(runs, opts)


def pick(runs: Sequence[Phase], opts: argparse.Namespace) -> Phase:
    """The best of some runs of one phase, as timeit does (the machine's other
    work only ever adds): the lowest server CPU per delivery, or for a latency
    phase the lowest user-space p99, among the calm runs (``--max-other``; if
    none is, the least disturbed). Losses are never hidden: a run that lost
    messages or timed out is the one kept. Every run's figures stay in
    ``runs``."""
    bad = [p for p in runs if p.lost or p.timed_out or p.errors]
    calm = [p for p in runs if p.pct(p.other_cpu_s) <= opts.max_other]
    pool = calm or sorted(runs, key=lambda p: p.pct(p.other_cpu_s))[:max(1, opts.repeat)]
    if bad:
        best = bad[0]
    elif runs[0].user_latency_ms:
        best = min(pool, key=lambda p: p.user_latency_ms.get("p99", float("inf")))
    else:
        best = min(pool, key=lambda p: p.us)
    best.runs = [r for p in runs for r in (p.runs or [p.summary()])]
    best.attempts = len(best.runs)
    return best


def merge(into: StackResult, new: StackResult, opts: argparse.Namespace) -> None:
    """``--rounds``: fold another round of a stack into its result, phase by phase."""
    for phase in new.phases:
        key = (phase.name, phase.n, phase.publisher)
        for i, old in enumerate(into.phases):
            if (old.name, old.n, old.publisher) == key:
                into.phases[i] = pick([old, phase], opts)
                break
        else:
            into.phases.append(phase)
    if new.idle is not None and (into.idle is None or not into.idle.opened or (
            new.idle.opened and new.idle.other_cpu_s / max(new.idle.seconds, 1e-9)
            < into.idle.other_cpu_s / max(into.idle.seconds, 1e-9))):
        into.idle = new.idle  # the calmer one
    into.errors.extend(e for e in new.errors if e not in into.errors)


async def idle(stack: Stack, opts: argparse.Namespace, progress: Progress, n: int,
               huge: bool = False) -> Idle:
    """Fresh server, a few warm-up connections, then ``n`` more held idle."""
    result = Idle(n)
    procs, sources, nofile = 1, [], 0
    if huge:
        result.nofile_before = raise_nofile(0)
        nofile = n + 4096
        result.nofile = raise_nofile(nofile)  # inherited by the server and the load generator
        room = (result.nofile[0] - FD_MARGIN) * stack.workers - 10  # 10 warm-up connections
        if room < n:
            result.note = (f"RLIMIT_NOFILE is {result.nofile[0]} (hard {result.nofile[1]}, "
                           f"was {result.nofile_before[0]}) per process: {room:,} connections "
                           f"at most, not {n:,}")
            n = result.connections = room
        per_source = 25_000  # loopback has ~28k ephemeral ports per source address
        procs = max(1, -(-n // 12_500))
        sources = [f"127.0.0.{2 + i}" for i in range(max(procs, -(-n // per_source)))]
    session = Session(stack, opts, progress, procs=procs, nofile=nofile)
    try:
        await session.start()
        assert session.server is not None
        await session.connect(10, f"{stack.key} idle warm-up", sources)
        await asyncio.sleep(0.3)
        result.rss0_kib = tree_rss_kib(session.server.pid)
        cpu0 = tree_cpu_seconds(session.server.pid)
        sys0 = system_cpu_seconds()
        rep = await session.connect(n, f"{stack.key} idle x{n:,}", sources,
                                    concurrency=200 if huge else 100)
        result.server_cpu_s = tree_cpu_seconds(session.server.pid) - cpu0
        result.loadgen_cpu_s = rep["cpu"]
        result.other_cpu_s = max(0.0, system_cpu_seconds() - sys0 - result.server_cpu_s
                                 - result.loadgen_cpu_s)
        result.opened, result.failed = rep["ok"], rep["failed"]
        result.seconds, result.errors = rep["seconds"], rep["errors"]
        await asyncio.sleep(1.0)  # let the server settle before reading its RSS
        result.rss1_kib = tree_rss_kib(session.server.pid)
        result.processes = len(proc_tree(session.server.pid))
    except Exception as exc:
        result.note = (result.note + "; " if result.note else "") + f"{type(exc).__name__}: {exc}"
        progress.note(f"  {stack.key}: idle error: {exc}")
    finally:
        await session.close()
    return result


async def channels(stack: Stack, opts: argparse.Namespace, progress: Progress,
                   res: StackResult) -> None:
    """C channels x S subscribers, P native publishers (each its share of the
    channels): delivery throughput, then user-space latency at ``--channel-rate``
    publications/s in all."""
    names = [f"bench/c{i:03d}" for i in range(opts.channels)]
    total = opts.channels * opts.channel_subscribers
    session = Session(stack, opts, progress, procs=opts.channel_procs, nofile=total + 4096,
                      channel_steps=[channel_steps(c) for c in names])
    raise_nofile(total + 4096)
    try:
        await session.start()
        # a source address of their own: after --huge, 127.0.0.1's client ports
        # may still be held (another scenario's sockets in TIME_WAIT)
        sources = [f"127.0.0.{20 + i}" for i in range(opts.channel_procs)]
        report = await session.connect(total, f"{stack.key} {opts.channels} channels x "
                                     f"{opts.channel_subscribers}", sources)
        if session.n < total:
            raise RuntimeError(f"only {session.n} of {total} subscribers connected: "
                               f"{report['errors']}")
        publishers = max(1, min(opts.publishers, len(names)))
        base = stack.sub_path  # the native socket: /ws or /rt/ws
        for p in range(publishers):
            await session.open_publisher(base, names[p::publishers],
                                         steps=[("recv", b'{"type":"welcome"')])
        pad = session.pad
        session.payload = lambda channel, ts, seq: native_publish(channel, ts, seq, pad)
        warm = await session.phase("warmup", opts.warmup, warmup=True)
        if warm.short or warm.timed_out:
            raise RuntimeError(f"warm-up: {warm.short} subscribers did not get every "
                               f"message ({warm.errors[:2]})")
        rounds = max(20, int(1_500_000 * opts.max_seconds) // total)  # the time cap ends it
        for mode in opts.publisher_modes:
            session.publisher = mode
            res.channels.append(await best_of(opts, partial(
                session.phase, "throughput", rounds, max_s=opts.max_seconds)))
        if opts.latency_seconds > 0:
            per_round = opts.channel_rate / len(names)
            res.channels.append(await best_of(opts, partial(
                session.phase, "latency", max(2, int(per_round * opts.latency_seconds)),
                rate=per_round, sample=1, latency=True)))
    except Exception as exc:
        res.errors.append(f"channels: {type(exc).__name__}: {exc}")
        progress.note(f"  {stack.key}: channels error: {exc}")
    finally:
        await session.close()


def _missing(stack: Stack) -> str | None:
    missing = [m for m in stack.requires if importlib.util.find_spec(m) is None]
    if missing:
        return f"skipped: {', '.join(missing)} not installed (pip install -e '.[bench]')"
    if stack.binary is not None and stack.binary() is None:
        return f"skipped: no executable for {stack.key} (TIDINGS_NATS_SERVER)"
    if stack.broker is not None and not broker_pids(stack.broker):
        return f"skipped: no {stack.broker} server running on this machine"
    return None


async def run_stack(stack: Stack, opts: argparse.Namespace, progress: Progress) -> StackResult:
    res = StackResult(stack)
    why = _missing(stack)
    if why:
        res.errors.append(why)
        progress.note(f"  {stack.key}: {why}")
        return res
    if opts.idle > 0 and stack.idle:
        res.idle = await idle(stack, opts, progress, opts.idle)
        if res.idle.note:
            res.errors.append(f"idle: {res.idle.note}")
    await fanout(stack, opts, progress, res)
    return res


# -- main ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="tidings and its peers side by side: fan-out, latency, idle memory, "
                    "connect rate, brokers, scale (issues 7 and 17).")
    parser.add_argument("--quick", action="store_true",
                        help=f"stacks {', '.join(GROUPS['quick'])}; N = 1, 100; shorter "
                             "phases; 500 idle connections: under a minute")
    parser.add_argument("--stacks", nargs="+", default=None, metavar="KEY",
                        help=f"stacks or groups ({', '.join(GROUPS)}) to run (default: peers; "
                             f"keys: {', '.join(STACKS)})")
    parser.add_argument("--subscribers", type=int, nargs="+", default=None, metavar="N",
                        help="fan-out sizes (default 1 100 1000; --quick: 1 100)")
    parser.add_argument("--publisher", choices=list(PUBLISHERS), default="batched",
                        help="throughput phases: 32 frames a write (batched, the default), "
                             "one frame a write with a loop turn between (single), or both "
                             "in the same run")
    parser.add_argument("--idle", type=int, default=None, metavar="N",
                        help="idle connections for the memory/connect-rate scenario "
                             "(default 2000; --quick: 500; 0: skip)")
    parser.add_argument("--rate", type=float, default=200.0, help="msg/s of the latency phase")
    parser.add_argument("--latency-read", choices=["stamped", "uvloop"], default="stamped",
                        help="how the latency subscribers read: a recvmsg transport that "
                             "also keeps the kernel's receive timestamps (both timings, the "
                             "default), or uvloop's transport (user-space timing only)")
    parser.add_argument("--loadgen-policy", choices=["normal", "batch"], default="normal",
                        help="scheduling policy of the subscribers' load-generator processes: "
                             "SCHED_OTHER (normal, the default), or SCHED_BATCH, which the "
                             "kernel never lets preempt a running task when a write wakes "
                             "it: on a VM that packs the server and the load generator on "
                             "one vCPU, the reader then no longer interrupts a fan-out, as "
                             "clients on other machines would not (docs/latency.md)")
    parser.add_argument("--latency-seconds", type=float, default=None,
                        help="length of the latency phase (default 4; --quick: 1.5; 0: skip)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time cap of one throughput phase (default 3; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up messages (default 100)")
    parser.add_argument("--repeat", type=int, default=1, metavar="K",
                        help="run each throughput and latency phase K times and keep the "
                             "best run (losses are never hidden)")
    parser.add_argument("--rounds", type=int, default=1, metavar="K",
                        help="run the whole list of stacks K times (every other round in "
                             "reverse order) and keep each phase's best run over the rounds")
    parser.add_argument("--max-other", type=float, default=float("inf"), metavar="PCT",
                        help="a run during which the rest of the machine took more than PCT "
                             "%% of a CPU does not count towards --repeat (default: all count)")
    parser.add_argument("--retries", type=int, default=0, metavar="R",
                        help="extra runs allowed per phase to find --repeat calm ones")
    parser.add_argument("--max-ahead", type=int, default=500,
                        help="messages the publisher may be ahead of the slowest subscriber")
    parser.add_argument("--max-backlog", type=int, default=100_000,
                        help="deliveries the publisher may be ahead of the subscribers "
                             "(default 100,000: with N = 1000, 100 messages)")
    parser.add_argument("--huge", action="store_true",
                        help="also the many idle connections test (tidings serve; "
                             "--huge-stacks for others)")
    parser.add_argument("--huge-connections", type=int, default=T_HUGE_CONNS, metavar="N")
    parser.add_argument("--huge-stacks", nargs="+", default=["tidings"], metavar="KEY")
    parser.add_argument("--channels", type=int, default=0, metavar="C",
                        help="also C channels x --channel-subscribers, --publishers native "
                             "publishers (tidings; --channel-stacks)")
    parser.add_argument("--channel-subscribers", type=int, default=100, metavar="S")
    parser.add_argument("--publishers", type=int, default=10, metavar="P")
    parser.add_argument("--channel-rate", type=float, default=200.0,
                        help="publications/s in all of the many-channels latency phase")
    parser.add_argument("--channel-procs", type=int, default=1,
                        help="load-generator processes of the many-channels scenario")
    parser.add_argument("--channel-stacks", nargs="+", default=["tidings"], metavar="KEY")
    parser.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                        help="also write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    return parser


def _keys(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for key in GROUPS.get(name, (name,)):
            if key not in out:
                out.append(key)
    return out


async def _run(opts: argparse.Namespace, stacks: Sequence[Stack],
               progress: Progress) -> list[StackResult]:
    results: list[StackResult] = []

    def result_for(key: str) -> StackResult:
        res = next((r for r in results if r.stack.key == key), None)
        if res is None:
            res = StackResult(STACKS[key])
            results.append(res)
        return res

    for round_ in range(opts.rounds):
        # every other round in the reverse order, so that a slow drift of the
        # machine's load does not favour the stacks that run first
        for stack in stacks if round_ % 2 == 0 else reversed(stacks):
            progress.note(f"{stack.key}: {stack.label.replace('*', '')}"
                          + (f" (round {round_ + 1} of {opts.rounds})" if opts.rounds > 1 else ""))
            res = await run_stack(stack, opts, progress)
            if round_ == 0:
                results.append(res)
            else:
                merge(result_for(stack.key), res, opts)
    if opts.huge:
        for key in opts.huge_stacks:
            result_for(key).huge = await idle(STACKS[key], opts, progress,
                                              opts.huge_connections, huge=True)
    if opts.channels > 0:
        for key in opts.channel_stacks:
            await channels(STACKS[key], opts, progress, result_for(key))
    return results


def _settle(opts: argparse.Namespace) -> None:
    opts.publisher_modes = PUBLISHERS[opts.publisher]
    opts.subscribers = opts.subscribers or ([1, 100] if opts.quick else [1, 100, 1000])
    if opts.idle is None:
        opts.idle = 500 if opts.quick else 2000
    if opts.latency_seconds is None:
        opts.latency_seconds = 1.5 if opts.quick else 4.0
    if opts.max_seconds is None:
        opts.max_seconds = 1.0 if opts.quick else 3.0
    if opts.warmup is None:
        opts.warmup = 50 if opts.quick else 100


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    if sys.platform != "linux":
        print("benchmarks.compare reads /proc: Linux only", file=sys.stderr)
        return 2
    keys = _keys(opts.stacks or (["quick"] if opts.quick else ["peers"]))
    unknown = [k for k in [*keys, *opts.huge_stacks, *opts.channel_stacks] if k not in STACKS]
    if unknown:
        print(f"unknown stack(s) {unknown}; known: {', '.join(STACKS)}; groups: "
              f"{', '.join(GROUPS)}", file=sys.stderr)
        return 2
    if opts.repeat < 1:
        print("--repeat must be at least 1", file=sys.stderr)
        return 2
    _settle(opts)
    progress = Progress(enabled=not opts.no_progress)
    facts = machine_facts()
    versions = _versions()
    facts["loadgen_loop"] = loop_name()
    progress.note(f"compare: {facts['cpu_model']}, {facts['cpus_usable']} CPUs, Python "
                  f"{facts['python']}, load generator on {facts['loadgen_loop']}, "
                  f"load average {os.getloadavg()[0]:.2f}")
    started = time.time()
    load0 = os.getloadavg()
    results: list[StackResult] = []
    try:
        results = run_fast(_run(opts, [STACKS[k] for k in keys], progress))
    except KeyboardInterrupt:
        progress.note("interrupted")
    duration = time.time() - started
    tables = {"main": main_table(results), "detail": detail_table(results),
              "per_message": per_message_table(results), "brokers": broker_table(results),
              "huge": huge_table(results), "channels": channels_table(results)}
    for name, md in tables.items():
        if md and (name in ("main", "detail") or md.count("\n") > 1):
            print(md)
            print()
    items, items17 = targets(results), targets17(results)
    if items:
        print("Targets (issue 7):")
        print("\n".join(target_lines(items)))
    if items17:
        print("\nTargets (issue 17):")
        print("\n".join(target_lines(items17)))
    errors = [f"{r.stack.key}: {e}" for r in results for e in r.errors]
    if errors:
        print("\nErrors:")
        print("\n".join(f"- {e}" for e in errors))
    print(f"\n({duration:.0f} s; load average before {load0[0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f})")
    if opts.json_out:
        _write_json(opts, argv, started, duration, load0, facts, versions, results,
                    items, items17, tables)
    lossy = any(p.lost for r in results for p in [*r.phases, *r.channels])
    skipped = any(e.startswith("skipped:") for r in results for e in r.errors)
    failed = [e for e in errors if "skipped:" not in e]
    return 1 if failed or lossy or (len(results) < len(keys) and not skipped) else 0


def _write_json(opts: argparse.Namespace, argv: Sequence[str] | None, started: float,
                duration: float, load0: tuple[float, float, float], facts: dict[str, Any],
                versions: dict[str, str], results: Sequence[StackResult],
                items: list[dict[str, Any]], items17: list[dict[str, Any]],
                tables: dict[str, str]) -> None:
    report = {
        "benchmark": "compare",
        "command": "python -m benchmarks.compare " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(duration, 1),
        "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg()),
        "machine": facts, "versions": versions,
        "settings": {k: v for k, v in vars(opts).items() if k != "json_out"},
        "results": [r.to_dict() for r in results],
        "targets": items, "targets17": items17,
        "table_markdown": tables["main"], "detail_markdown": tables["detail"],
        "tables_markdown": tables,
    }
    Path(opts.json_out).write_text(
        orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n", "utf-8")


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("tidings", "websockets", "uvicorn", "fastapi", "starlette", "broadcaster",
                 "fastapi-distributed-websocket", "python-socketio", "python-engineio",
                 "redis", "orjson", "uvloop", "picows", "asyncpg"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


if __name__ == "__main__":
    sys.exit(main())
