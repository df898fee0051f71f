"""The default server (``--engine auto``) against ``--engine torch`` and ``--engine openvino``, on this CPU.

    python benchmarks/engine_auto.py                              # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/engine_auto.py      # as an AVX2-only CPU would run (fp32)

Starts the servers at once (``--untrained --audio-cache 0``: every sound is
new to the model anyway, but the cache must not answer a repeat), then in
alternating rounds measures one client sending 2-s 44.1 kHz sounds one at a
time (p50, p99) and 16 such clients at once (sounds/s). Reports the engine
``auto`` chose and what it measured at start, the precision, and every figure
as a ratio to ``--engine torch`` in the same run, with the CPU class. Writes
``engine_auto.md`` and ``.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np
import websockets
from latency import ROOT, Server, many_at_once, one_at_a_time, sound

from clap_ws.cpu import describe

SERVERS = {"default (auto)": [], "--engine torch": ["--engine", "torch"], "--engine openvino": ["--engine", "openvino"]}


def different(sounds: int, seed: int) -> list[bytes]:
    """``sounds`` different 2-s sounds at 44.1 kHz (the audio cache is off, but no sound repeats anyway)."""
    return [sound(2.0, 44100, seed * 1000 + i).tobytes() for i in range(sounds)]


async def info(port: int) -> dict:
    async with websockets.connect(f"ws://127.0.0.1:{port}/clap", max_size=None) as ws:
        await ws.send(json.dumps({"op": "info"}))
        return json.loads(await asyncio.wait_for(ws.recv(), 60))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sounds", type=int, default=20, help="sounds of the one-client run, per round")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--client-sounds", type=int, default=4, help="sounds per client in the many-client run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    base = ["-m", "clap_ws", "serve", "--untrained", "--audio-cache", "0"]
    servers = {name: Server([*base, *options], name, start_timeout=600) for name, options in SERVERS.items()}
    rows: dict[str, dict] = {name: {"one": [], "many": []} for name in servers}
    try:
        for name, server in servers.items():
            rows[name]["info"] = asyncio.run(info(server.port))
        for r in range(args.rounds):
            for name in list(servers) if r % 2 == 0 else list(servers)[::-1]:
                port = servers[name].port
                rows[name]["one"] += asyncio.run(one_at_a_time(port, different(args.sounds, r)))
                rows[name]["many"].append(asyncio.run(many_at_once(
                    port, [different(args.client_sounds, r * 100 + c) for c in range(args.clients)])))
            print(f"round {r + 1}: " + ", ".join(f"{n} {np.median(v['one']):.1f} ms / {v['many'][-1]:.1f}/s"
                                                for n, v in rows.items()), flush=True)
    finally:
        rss = {name: server.peak_rss_mb() for name, server in servers.items()}
        for server in servers.values():
            server.stop()
    torch_p50 = np.median(rows["--engine torch"]["one"])
    torch_rate = np.median(rows["--engine torch"]["many"])
    auto = rows["default (auto)"]["info"].get("engine_auto") or {}
    lines = [f"{describe()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; untrained HTSAT-tiny, "
             f"2-s sounds at 44.1 kHz, --audio-cache 0, {args.rounds} alternating rounds", "",
             f"auto measured at start (ms per window): {auto.get('ms_per_window')}; chose {auto.get('chosen')}; "
             f"left out: {auto.get('left_out')}", "",
             f"| server | engine | precision | 1 client p50 ms | p99 ms | x torch | {args.clients} clients sounds/s | "
             "x torch | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        p50, rate = np.median(row["one"]), np.median(row["many"])
        lines.append(f"| {name} | {row['info']['engine']} | {row['info']['precision']} | {p50:.1f} | "
                     f"{np.percentile(row['one'], 99):.1f} | {p50 / torch_p50:.2f} | {rate:.1f} | "
                     f"{rate / torch_rate:.2f} | {rss[name]:.0f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_auto.md").write_text("\n".join(lines) + "\n")
    (out / "engine_auto.json").write_text(json.dumps({"machine": describe(), "rows": rows}, indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
