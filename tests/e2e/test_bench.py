"""The benchmark harness still measures what it says: short runs, checked for
behaviour (every delivery counted and checked, every latency frame timed), not
for speed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the benchmarks read /proc")


def test_compare_counts_every_delivery_and_times_every_latency_frame(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--stacks", "tidings",
         "--subscribers", "1", "100", "--idle", "50", "--latency-seconds", "0.5",
         "--max-seconds", "0.3", "--warmup", "5", "--no-progress", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())["results"][0]
    assert result["errors"] == []
    phases = {(p["name"], p["subscribers"]): p for p in result["phases"]}
    assert set(phases) == {("throughput", 1), ("throughput", 100), ("latency", 100)}
    for phase in phases.values():
        assert phase["lost"] == 0 and phase["errors"] == []
        assert phase["deliveries"] == phase["messages"] * phase["subscribers"] > 0
        assert phase["server_cpu_us_per_delivery"] > 0
    latency = phases["latency", 100]
    # each frame of the 99 subscribers timed by the kernel (the N = 1 one is not)
    assert latency["latency_samples"] == latency["messages"] * 99
    # kernel receive times against the publisher's clock: positive and sane
    assert 0 < latency["latency_ms"]["p50"] <= latency["latency_ms"]["p99"] < 1000
    # the same frames timed when the client read them: never before the kernel had them
    user = latency["user_latency_ms"]
    assert latency["latency_ms"]["p50"] <= user["p50"] <= user["p99"] < 1000
    assert result["idle"]["opened"] == 50 and result["idle"]["rss_anon_kib_per_connection"] > 0


def test_compare_single_publisher_and_two_node_stacks(tmp_path: Path) -> None:
    """``--publisher both``: each throughput phase per batch and per message, on
    ``tidings serve``, on ``--workers 2`` (the publisher kept off the worker of the
    N = 1 subscriber, so its deliveries cross the ipc relay) and on nats-server's
    websocket when its binary is there (NATS protocol text in websocket frames)."""
    out = tmp_path / "compare.json"
    stacks = ["tidings", "tidings-ipc"]
    from benchmarks.stacks import nats_server_binary

    if nats_server_binary() is not None:
        stacks.append("nats-ws")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--stacks", *stacks, "--publisher", "both",
         "--subscribers", "1", "--idle", "0", "--latency-seconds", "0", "--max-seconds", "0.3",
         "--warmup", "5", "--no-progress", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = {r["stack"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == set(stacks)
    for result in results.values():
        assert result["errors"] == []
        phases = [p for p in result["phases"] if p["name"] == "throughput"]
        assert [p["publisher"] for p in phases] == ["batched", "single"]
        for phase in phases:
            assert phase["lost"] == 0 and phase["deliveries"] == phase["messages"] > 0
            assert phase["publisher_cpu_s"] > 0
    # --workers 2 at N = 1: the publisher is moved off the subscriber's worker, or
    # the report says it could not be (the kernel picks the worker that accepts:
    # on a loaded machine the same one may win every time)
    ipc = results["tidings-ipc"]["phases"][0]["placement"]
    assert (ipc.startswith("0 of 1 subscribers on the publisher's worker")
            or ipc.endswith("(could not separate them)")), ipc


def test_compare_scale_scenarios_alone(tmp_path: Path) -> None:
    """``--stacks none``: the many-channels scenario (each subscriber on its own
    channel of C, every publication reaching exactly its channel's
    subscribers, latency timed in user space) and the many-connections one
    (connections spread over source addresses, RSS per connection) without
    the fan-out stacks."""
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--stacks", "none", "--channels", "4",
         "--channel-subscribers", "5", "--publishers", "2", "--channel-rate", "40",
         "--max-seconds", "0.3", "--latency-seconds", "0.5", "--warmup", "5",
         "--huge", "--huge-connections", "300", "--no-progress", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [result] = json.loads(out.read_text())["results"]
    assert result["stack"] == "tidings" and result["phases"] == [] and result["errors"] == []
    throughput, latency = result["channels"]
    for phase in (throughput, latency):
        assert phase["channels"] == 4 and phase["subscribers"] == 20
        assert phase["lost"] == 0 and phase["errors"] == []
        # messages counts per subscriber: each got every publication of its channel
        assert phase["deliveries"] == phase["messages"] * 20 > 0
    assert latency["user_latency_ms"]["p50"] <= latency["user_latency_ms"]["p99"] < 1000
    huge = result["huge"]
    assert huge["opened"] == 300 and huge["failed"] == 0
    assert huge["rss_anon_kib_per_connection"] > 0 and huge["connections_per_s"] > 0


def test_writeloop_compares_the_hub_with_a_bare_write_loop() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.writeloop", "--subscribers", "5", "--messages", "20",
         "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    best = dict(line.removeprefix("best ").split(": ") for line in proc.stdout.splitlines()
                if line.startswith("best "))
    assert set(best) == {"hub", "raw"}
    assert all(float(v.removesuffix(" µs")) > 0 for v in best.values())


@pytest.mark.parametrize("mode", [[], ["--native"]], ids=["raw", "native"])
def test_hotpath_publishes_through_the_lean_server_without_sockets(mode: list[str]) -> None:
    # it exits non-zero unless every publication reached every subscriber
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.hotpath", "--subscribers", "3", "--burst", "5",
         "--seconds", "0.2", *mode],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"([\d,]+) publications, ([\d.]+) µs each, ([\d.]+) µs per delivery",
                      proc.stdout)
    assert found, proc.stdout
    assert int(found[1].replace(",", "")) > 0
    assert float(found[2]) == pytest.approx(3 * float(found[3]), rel=0.01)


def test_tidings_bench_passes_its_options_to_compare(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tidings.server.cli", "bench", "--quick", "--stacks", "tidings",
         "--subscribers", "1", "--repeat", "2", "--json", str(out),
         "--loadgen-policy", "batch", "--idle", "0"],  # these two: compare's own
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["repeat"] == 2 and report["settings"]["quick"]
    assert report["settings"]["stacks"] == ["tidings"]
    assert report["settings"]["loadgen_policy"] == "batch" and report["settings"]["idle"] == 0
    phases = report["results"][0]["phases"]
    assert [p["subscribers"] for p in phases if p["name"] == "throughput"] == [1]
    assert all(p["lost"] == 0 for p in phases)


def test_tidings_bench_refuses_what_compare_does_not_know() -> None:
    """An option neither ``tidings bench`` nor ``benchmarks.compare`` has is an
    error, said before anything runs; other commands take no unknown options."""
    proc = subprocess.run(
        [sys.executable, "-m", "tidings.server.cli", "bench", "--no-such-option"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "unrecognized arguments: --no-such-option" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "tidings.server.cli", "serve", "--rounds", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "unrecognized arguments: --rounds 3" in proc.stderr
