"""A polite client beside a greedy one: how long one sound at a time waits while another keeps many in flight.

    python benchmarks/fairness.py                          # this checkout, default and --max-batch-ms 0
    python benchmarks/fairness.py --old /tmp/before        # and another checkout, rounds alternating
    python benchmarks/fairness.py --variant "batch 8=--max-batch 8"   # more server options side by side

The greedy client keeps ``--in-flight`` 2-s sounds pipelined on one
connection for the whole round; the polite client sends one 2-s sound, waits
for its reply, and sends the next. The baseline in the same run is the polite
client alone. With one FIFO queue across connections the polite client waits
for the greedy backlog; served round-robin it waits about one batch, and
with ``--max-batch-ms`` a short one. Each server runs in its own process
(``--untrained --audio-cache 0``: the sounds repeat); the rounds alternate
between the servers, so drift on a shared host hits
both alike. Reports medians and the ratio to the polite-alone baseline, with
the CPU's instruction set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np
import websockets
from latency import ROOT, Server, many_at_once, one_at_a_time

from clap_ws.cpu import describe

SOUND = (0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * 44100) / 44100)).astype("<f4").tobytes()


async def greedy(port: int, in_flight: int, stop: asyncio.Event) -> list[float]:
    """Keep ``in_flight`` sounds queued until ``stop``; returns when each reply came (``perf_counter``)."""
    answered: list[float] = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/clap?sample_rate=44100", max_size=None) as ws:
        for _ in range(in_flight):
            await ws.send(SOUND)
        while not stop.is_set():
            await asyncio.wait_for(ws.recv(), 600)
            answered.append(time.perf_counter())
            await ws.send(SOUND)
        for _ in range(in_flight):
            await asyncio.wait_for(ws.recv(), 600)
    return answered


async def polite(port: int, sounds: int) -> list[float]:
    return await one_at_a_time(port, [SOUND] * sounds)


async def throughput(port: int, clients: int, sounds: int) -> float:
    """Sounds per second of ``clients`` polite clients at once (what fair batching must not cost)."""
    return await many_at_once(port, [[SOUND] * sounds for _ in range(clients)])


async def round_for(port: int, sounds: int, in_flight: int) -> tuple[list[float], list[float], float, float]:
    """Polite latencies alone and beside the greedy client; the greedy client's sounds/s and the server's
    (greedy and polite) while the polite client was beside it."""
    alone = await polite(port, sounds)
    stop = asyncio.Event()
    hog = asyncio.ensure_future(greedy(port, in_flight, stop))
    await asyncio.sleep(1.0)  # the backlog is queued
    started = time.perf_counter()
    beside = await polite(port, sounds)
    ended = time.perf_counter()
    stop.set()
    greedy_rate = sum(started <= t <= ended for t in await hog) / (ended - started)
    return alone, beside, greedy_rate, greedy_rate + len(beside) / (ended - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", help="another checkout to run beside this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sounds", type=int, default=8, help="polite sounds per round and condition")
    parser.add_argument("--in-flight", type=int, default=64, help="sounds the greedy client keeps queued")
    parser.add_argument("--clients", type=int, default=16, help="clients of the throughput rounds (0: none)")
    parser.add_argument("--variant", action="append", metavar="NAME=OPTIONS",
                        help='this checkout with other serve options, e.g. "batch 8=--max-batch 8" (repeatable; '
                             'default: "max-batch-ms 0=--max-batch-ms 0", the behaviour before the latency target)')
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    base = ["-m", "clap_ws", "serve", "--untrained", "--audio-cache", "0"]
    runs = {"new": (ROOT, [])} | ({"old": (Path(args.old).resolve(), [])} if args.old else {})
    for variant in args.variant if args.variant is not None else ["max-batch-ms 0=--max-batch-ms 0"]:
        name, _, options = variant.partition("=")
        runs[name] = (ROOT, options.split())
    servers = {name: Server([*base, *options], name, root=root) for name, (root, options) in runs.items()}
    results: dict[str, dict[str, list[float]]] = {
        name: {"alone": [], "beside": [], "greedy": [], "served": [], "throughput": []} for name in servers}
    try:
        for r in range(args.rounds):
            for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                alone, beside, rate, served = asyncio.run(round_for(servers[name].port, args.sounds, args.in_flight))
                results[name]["alone"] += alone
                results[name]["beside"] += beside
                results[name]["greedy"].append(rate)
                results[name]["served"].append(served)
                if args.clients:
                    results[name]["throughput"].append(
                        asyncio.run(throughput(servers[name].port, args.clients, args.sounds)))
                print(f"round {r + 1} {name}: polite alone p50 {np.median(alone):.0f} ms, beside a greedy client "
                      f"p50 {np.median(beside):.0f} ms", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    lines = [f"{describe()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; greedy client keeps "
             f"{args.in_flight} 2-s sounds in flight; {args.rounds} rounds x {args.sounds} polite sounds", "",
             f"| server | polite alone p50 ms | beside greedy p50 ms | p95 ms | x alone | greedy sounds/s | "
             f"both, sounds/s | {args.clients} clients, sounds/s (median) |", "|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        alone, beside = np.median(row["alone"]), np.median(row["beside"])
        rate = f"{np.median(row['throughput']):.1f}" if row["throughput"] else ""
        lines.append(f"| {name} | {alone:.0f} | {beside:.0f} | {np.percentile(row['beside'], 95):.0f} | "
                     f"{beside / alone:.1f} | {np.median(row['greedy']):.1f} | {np.median(row['served']):.1f} | "
                     f"{rate} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fairness.md").write_text("\n".join(lines) + "\n")
    (out / "fairness.json").write_text(json.dumps({"machine": describe(), "results": results}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
