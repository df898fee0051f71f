"""The audio cache on a synthesis-loop workload: throughput and p50 with and without it, in the same run.

    python benchmarks/cache.py                        # 240 sounds per round, 3 rounds, 4 clients
    python benchmarks/cache.py --repeat 0.3 --silence 0.1

Two servers run side by side as separate processes: the default (audio cache
on) and ``--audio-cache 0``. Each round sends both the same sequence of 2-s
sounds at 44.1 kHz from ``--clients`` connections, one request in flight per
connection, as a loop rendering a generation would: ``--repeat`` of them
repeat an earlier sound of the round (elites re-evaluated, offspring equal to
a parent), ``--silence`` are silent renders of varying length (broken
genomes), the rest are new. The servers take turns within each round, so
drift hits both; the report gives the median of the per-round figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np
import websockets
from latency import ROOT, Server, machine, sound

RATE = 44100


def workload(n: int, repeat: float, silence: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sounds: list[np.ndarray] = []
    for i in range(n):
        roll = rng.random()
        if roll < silence:
            sounds.append(np.zeros(int(RATE * rng.uniform(0.5, 3)), np.float32))
        elif roll < silence + repeat and sounds:
            sounds.append(sounds[int(rng.integers(len(sounds)))])
        else:
            sounds.append(sound(2.0, RATE, seed * 100_000 + i))
    return sounds


async def run(port: int, sounds: list[np.ndarray], clients: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for s in sounds:
        queue.put_nowait(s)
    times: list[float] = []
    cached = 0

    async def client() -> None:
        nonlocal cached
        async with websockets.connect(f"ws://127.0.0.1:{port}/clap?sample_rate={RATE}", max_size=None) as ws:
            while not queue.empty():
                s = queue.get_nowait()
                started = time.perf_counter()
                await ws.send(s.tobytes())
                reply = json.loads(await ws.recv())
                assert reply["status"] == "OK", reply
                times.append(time.perf_counter() - started)
                cached += bool(reply.get("cached"))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    return {"sounds_per_s": len(sounds) / wall, "p50_ms": 1000 * float(np.median(times)), "cached": cached}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sounds", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeat", type=float, default=0.3)
    parser.add_argument("--silence", type=float, default=0.1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    servers = {"cache on": Server(["-m", "clap_ws", "serve", "--untrained"], "cache on"),
               "cache off": Server(["-m", "clap_ws", "serve", "--untrained", "--audio-cache", "0"], "cache off")}
    rounds: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for r in range(args.rounds):
            sounds = workload(args.sounds, args.repeat, args.silence, seed=r)
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            for name in order:
                rounds[name].append(asyncio.run(run(servers[name].port, sounds, args.clients)))
    finally:
        for server in servers.values():
            server.stop()
    rows = {name: {"sounds_per_s": statistics.median(x["sounds_per_s"] for x in rs),
                   "p50_ms": statistics.median(x["p50_ms"] for x in rs),
                   "cached_share": statistics.median(x["cached"] for x in rs) / args.sounds}
            for name, rs in rounds.items()}
    ratios = [on["sounds_per_s"] / off["sounds_per_s"] for on, off in zip(rounds["cache on"], rounds["cache off"])]
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "sounds": args.sounds, "rounds": args.rounds,
            "clients": args.clients, "repeat": args.repeat, "silence": args.silence,
            "throughput_ratio_median": statistics.median(ratios), "model": "untrained HTSAT-tiny"}
    (out / "cache.json").write_text(json.dumps({"meta": meta, "rows": rows, "rounds": rounds}, indent=2))
    lines = [f"# The audio cache on a synthesis-loop workload ({args.repeat:.0%} repeats, {args.silence:.0%} silence)",
             "", f"Machine: {meta['machine']}; {meta['date']}; {args.clients} clients, {args.sounds} sounds of 2 s "
             f"at 44.1 kHz per round, {args.rounds} rounds (medians); model: {meta['model']}.", "",
             "| server | sounds/s | p50 ms | answered from the cache |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['sounds_per_s']:.1f} | {r['p50_ms']:.1f} | {r['cached_share']:.0%} |"
              for name, r in rows.items()]
    lines += ["", f"Throughput with the cache / without, median of the per-round ratios: "
                  f"{meta['throughput_ratio_median']:.2f}x"]
    (out / "cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
