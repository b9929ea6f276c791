"""`python -m bench.store_commit`: SqliteStore's group commit on its own, without the service.

N concurrent waiters each loop like a QoS 1 sendEvent and its PUBACK: append one event
(~200 bytes), await committed() (that latency is recorded), then append the event's
deletion without waiting for it (it rides in a later batch, as the PUBACK's does).
rows/s counts every committed row, events and deletions. Each (synchronous, N) pair runs
`--runs` times on a fresh file on the repository's disk (not /tmp, which may be tmpfs
where fsync costs nothing); the table shows medians and [min-max].
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import uvloop  # the service's loop (uvicorn[standard])

from endpoint_core.journal import DeleteEvent, PutEvent, StoredEvent
from store import DATABASE_FILE, SqliteStore, Synchronous

WORK = Path(__file__).resolve().parent / ".work"
PAYLOAD = b'{"type":"message","data":"' + b"x" * 170 + b'"}'


@dataclass(frozen=True)
class Run:
    rows_per_second: float
    p50_ms: float
    p99_ms: float
    commits: int
    rows: int


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


async def waiter(store: SqliteStore, endpoint_id: str, until: float, latencies: list[float]) -> None:
    seq = 0
    while time.perf_counter() < until:
        seq += 1
        store.append([PutEvent(StoredEvent(endpoint_id, seq, PAYLOAD))])
        started = time.perf_counter()
        await store.committed()
        latencies.append(time.perf_counter() - started)
        store.append([DeleteEvent(endpoint_id, seq)])


async def one_run(directory: Path, synchronous: Synchronous, waiters: int, seconds: float) -> Run:
    store = SqliteStore(directory / DATABASE_FILE, synchronous)
    store.load()
    store.start(asyncio.get_running_loop())
    latencies: list[float] = []
    started = time.perf_counter()
    try:
        await asyncio.gather(*(waiter(store, f"endpoint-{i}", started + seconds, latencies) for i in range(waiters)))
        await store.committed()  # the last deletions
    finally:
        elapsed = time.perf_counter() - started
        await store.close()
    latencies.sort()
    stats = store.stats
    return Run(stats.rows_committed / elapsed, percentile(latencies, 0.50) * 1000, percentile(latencies, 0.99) * 1000,
               stats.commits, stats.rows_committed)


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):,.{digits}f} [{min(values):,.{digits}f}-{max(values):,.{digits}f}]"


def report(results: dict[tuple[str, int], list[Run]]) -> None:
    print(f"{'synchronous':<12}{'N':>4}  {'rows/s':<28}{'p50 ms':<22}{'p99 ms':<22}{'rows/commit':>11}")
    for (synchronous, waiters), runs in results.items():
        rows_per_commit = statistics.median(r.rows / max(1, r.commits) for r in runs)
        print(f"{synchronous:<12}{waiters:>4}  {spread([r.rows_per_second for r in runs], 0):<28}"
              f"{spread([r.p50_ms for r in runs], 2):<22}{spread([r.p99_ms for r in runs], 2):<22}"
              f"{rows_per_commit:>11.1f}")
    print("\nnormal / full, medians:")
    for synchronous, waiters in results:
        if synchronous != "full" or ("normal", waiters) not in results:
            continue
        full, normal = results["full", waiters], results["normal", waiters]
        throughput = statistics.median(r.rows_per_second for r in normal) / statistics.median(
            r.rows_per_second for r in full)
        p99 = statistics.median(r.p99_ms for r in normal) / statistics.median(r.p99_ms for r in full)
        print(f"  N={waiters:<3} rows/s x{throughput:.2f}   p99 x{p99:.2f}")


async def measure(arguments: argparse.Namespace) -> dict[tuple[str, int], list[Run]]:
    results: dict[tuple[str, int], list[Run]] = {}
    WORK.mkdir(exist_ok=True)
    for synchronous in arguments.synchronous:
        for waiters in arguments.waiters:
            for run in range(arguments.runs):
                directory = Path(tempfile.mkdtemp(prefix="store-commit-", dir=arguments.dir))
                try:
                    outcome = await one_run(directory, synchronous, waiters, arguments.seconds)
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
                results.setdefault((synchronous, waiters), []).append(outcome)
                print(f"  {synchronous} N={waiters} run {run + 1}: {outcome.rows_per_second:,.0f} rows/s, "
                      f"p99 {outcome.p99_ms:.2f} ms", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_commit", description=__doc__.split("\n")[0])
    parser.add_argument("--waiters", type=lambda text: [int(n) for n in text.split(",")], default=[1, 16, 64])
    parser.add_argument("--synchronous", type=lambda text: text.split(","), default=["full", "normal"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="of load per run")
    parser.add_argument("--dir", type=Path, default=WORK, help="where the files go (a real disk, not tmpfs)")
    arguments = parser.parse_args()
    report(uvloop.run(measure(arguments)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
