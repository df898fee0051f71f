"""What the Python client (clients/python) costs: 16 clients through it against raw websockets, one server.

    python benchmarks/python_client.py                 # 3 alternating rounds of 16 clients x 8 sounds each
    python benchmarks/python_client.py --quick         # a tiny run (the smoke test)

One server (``--untrained --audio-cache 0``: every sound reaches the model), 2-s sounds at 48 kHz. In each
round 16 raw websockets clients (a binary frame, a JSON reply, as the legacy clients do) and then 16
AsyncClapClient instances (binary frames both ways) each send their sounds one after another; the order of
the two alternates per round, so drift hits both alike. Reports sounds/s per round, the medians and
client / raw; the issue's bound is a cost of at most 5 % (a ratio of at least 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients" / "python"))
from clap_ws_client import AsyncClapClient  # noqa: E402
from latency import Server  # noqa: E402

from clap_ws.cpu import describe  # noqa: E402


def sounds(count: int, seconds: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(48_000 * seconds))).astype(np.float32) for _ in range(count)]


async def raw(port: int, clips: list[np.ndarray]) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{port}/clap?sample_rate=48000", max_size=None,
                                  compression=None) as ws:
        for clip in clips:
            await ws.send(clip.tobytes())
            assert json.loads(await ws.recv())["status"] == "OK"


async def client(port: int, clips: list[np.ndarray]) -> None:
    async with AsyncClapClient(f"ws://127.0.0.1:{port}/clap", timeout=600) as c:
        for clip in clips:
            assert (await c.embed(clip)).embedding.shape == (512,)


async def round_of(kind, port: int, clients: int, per_client: int, seconds: float, seed: int) -> float:
    batches = [sounds(per_client, seconds, seed * 1000 + k) for k in range(clients)]
    started = time.perf_counter()
    await asyncio.gather(*(kind(port, clips) for clips in batches))
    return clients * per_client / (time.perf_counter() - started)


async def run(port: int, rounds: int, clients: int, per_client: int, seconds: float) -> dict:
    out: dict[str, list[float]] = {"raw": [], "client": []}
    for r in range(rounds):
        order = [("raw", raw), ("client", client)][:: 1 if r % 2 == 0 else -1]
        for name, kind in order:
            out[name].append(await round_of(kind, port, clients, per_client, seconds, seed=r))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 clients x 2 half-second sounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.clients, args.per_client, args.seconds = 2, 2, 2, 0.5
    server = Server(["-m", "clap_ws", "serve", "--untrained", "--audio-cache", "0"], "clap-ws")
    try:
        results = asyncio.run(run(server.port, args.rounds, args.clients, args.per_client, args.seconds))
    finally:
        server.stop()
    median = {name: float(np.median(values)) for name, values in results.items()}
    print(f"{args.clients} clients x {args.per_client} sounds of {args.seconds:g} s, {args.rounds} rounds; "
          f"{describe()}")
    print("| | raw websockets | clap_ws_client | client / raw |\n|---|---|---|---|")
    for r, (a, b) in enumerate(zip(results["raw"], results["client"]), 1):
        print(f"| round {r} sounds/s | {a:.2f} | {b:.2f} | {b / a:.3f} |")
    print(f"| median sounds/s | {median['raw']:.2f} | {median['client']:.2f} | "
          f"{median['client'] / median['raw']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
