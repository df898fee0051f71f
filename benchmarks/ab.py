"""Two checkouts of clap-ws side by side: the same requests, alternating between their servers.

    git worktree add /tmp/before HEAD~1
    python benchmarks/ab.py /tmp/before                      # this checkout against that one
    python benchmarks/ab.py /tmp/before --form text-uncached -- --precision fp32
    python benchmarks/ab.py . --new-options="--engine openvino"   # one checkout, two settings

On a shared machine timings drift by 20 % or more between runs, which hides
any change smaller than that when two versions are benchmarked one after the
other. Here both servers run at once and take turns: each request goes to one
server, then the same request to the other (which goes first alternates), on
one persistent connection each, so drift hits both alike. It reports each
side's median model time and end-to-end latency, the ratio new/old, and each
server's peak resident memory. Server options after ``--`` go to both;
``--new-options`` adds some to the new side only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import websockets
from latency import ROOT, Config, Server, message_for

FORMS = ("binary", "base64", "batch", "text-uncached", "text-cached")  # the ones answered in JSON


async def alternate(ports: dict[str, int], config: Config, requests: int) -> dict[str, dict[str, list[float]]]:
    query = f"sample_rate={config.rate}"
    out = {name: {"latency": [], "model": []} for name in ports}
    sockets = {name: await websockets.connect(f"ws://127.0.0.1:{port}/clap?{query}", max_size=None,
                                              compression=None) for name, port in ports.items()}
    try:
        for i in range(requests + 2):  # the first two are warm-up
            message = message_for(config, i)
            for name in (list(ports) if i % 2 else list(ports)[::-1]):
                started = time.perf_counter()
                await sockets[name].send(message)
                reply = json.loads(await sockets[name].recv())
                if reply.get("status") != "OK":
                    raise RuntimeError(f"{name}: {reply}")
                if i >= 2:
                    out[name]["latency"].append((time.perf_counter() - started) * 1000)
                    out[name]["model"].append(reply.get("model_ms", float("nan")))
    finally:
        for ws in sockets.values():
            await ws.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s OLD [options] [-- server options]")
    parser.add_argument("old", type=Path, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--new", type=Path, default=ROOT, help="default: this checkout")
    parser.add_argument("--form", default="binary", choices=FORMS)
    parser.add_argument("--seconds", type=float, default=2.0, help="sound length")
    parser.add_argument("--rate", type=int, default=44100, help="input sample rate")
    parser.add_argument("--requests", type=int, default=40, help="per server, after 2 warm-up requests")
    parser.add_argument("--new-options", default="", metavar="'OPTIONS'",
                        help="server options for the new side only (one string)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    options = argv[split + 1 :]  # for both servers
    if "--untrained" not in options and "--checkpoint" not in options:
        options.append("--untrained")
    config = Config("a/b", "both", seconds=args.seconds, rate=args.rate, form=args.form)
    servers = {}
    try:
        for name, root in (("old", args.old.resolve()), ("new", args.new.resolve())):
            extra = shlex.split(args.new_options) if name == "new" else []
            servers[name] = Server(["-m", "clap_ws", "serve", *options, *extra], name, root=root)
        results = asyncio.run(alternate({n: s.port for n, s in servers.items()}, config, args.requests))
        rss = {name: server.peak_rss_mb() for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    median = {name: {k: float(np.nanmedian(v)) for k, v in r.items()} for name, r in results.items()}
    print(f"{args.form}, {args.seconds:g} s at {args.rate} Hz, {args.requests} requests each, server options "
          f"{' '.join(options)}" + (f", new side also {args.new_options}" if args.new_options else ""))
    print("| | old | new | new / old |\n|---|---|---|---|")
    for key, label in (("model", "model p50 ms"), ("latency", "end to end p50 ms")):
        old, new = median["old"][key], median["new"][key]
        print(f"| {label} | {old:.1f} | {new:.1f} | {new / old:.2f} |")
    print(f"| peak RSS MB | {rss['old']:.0f} | {rss['new']:.0f} | {rss['new'] / rss['old']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
