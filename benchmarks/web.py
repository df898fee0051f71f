"""Text search from the HTTP API and from the page's WebSocket path, on a 100k-item library; the page's weight.

    python benchmarks/web.py                 # 100k items, 200 searches per row
    python benchmarks/web.py --items 20000 --requests 50

A real server runs as a separate process (``clap-ws serve --untrained
--library``) with a synthetic library of ``--items`` items (CLAP-like
embeddings from benchmarks/search.py, paths in 100 folders, as tags).
Each row sends its searches one at a time, top 15, and reports p50 and p99
of the client's wall time:

* ``cached text``: the same query text every time, so its embedding comes
  from the prompt cache: what one search costs (HTTP: a new TCP connection
  per request, since websockets closes after every HTTP answer);
* ``new text``: a different text every time, so each one also runs the text
  tower: what a person typing a new query waits for;
* ``tag filter``: cached text plus a tag that 1 % of the items carry.

Also the bytes of the page's first load (``/`` and every file it pulls in).
Every report names the CPU and its instruction set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import websockets
from latency import ROOT, Server, machine
from search import synthetic

from clap_ws.model import ClapModel
from clap_ws.model.checkpoint import Architecture
from clap_ws.model.clap import model_identity
from clap_ws.search.index import VectorIndex
from clap_ws.search.library import Library

PAGE_FILES = ("/", "/static/app.js", "/static/style.css", "/static/clap-ws-client.js", "/static/favicon.svg")


def make_library(n: int, path: Path) -> None:
    vectors, _ = synthetic(n, 1)
    identity = model_identity(ClapModel.untrained(Architecture("HTSAT-tiny"), seed=0, precision="fp32"))
    items = [{"path": f"folder{i % 100:02d}/sound{i:06d}.wav", "duration": 0.5 + (i % 40) / 4,
              "sample_rate": 48000, "channels": 1, "tags": [f"folder{i % 100:02d}"]} for i in range(n)]
    Library("bench", identity, items, VectorIndex(vectors, "flat"), "/nonexistent").save(path)


def http_search(port: int, query: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?{query}", timeout=60) as r:
        return json.loads(r.read())


async def ws_searches(port: int, messages: list[dict]) -> list[float]:
    times = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/clap", max_size=None) as ws:
        for message in messages:
            started = time.perf_counter()
            await ws.send(json.dumps(message))
            reply = json.loads(await ws.recv())
            assert reply["status"] == "OK", reply
            times.append(time.perf_counter() - started)
    return times


def summary(times: list[float]) -> dict:
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "requests": len(ms)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        library = Path(tmp) / "bench.npz"
        make_library(args.items, library)
        server = Server(["-m", "clap_ws", "serve", "--untrained", "--library", str(library)], "clap-ws")
        try:
            port = server.port
            page = sum(len(urllib.request.urlopen(f"http://127.0.0.1:{port}{p}", timeout=30).read())
                       for p in PAGE_FILES)
            n = args.requests
            rows = []
            texts = [f"a warm analogue pad number {i}" for i in range(3 * n)]
            cases = {
                "cached text": ([{"text": "dry kick drum"}] * n),
                "new text": [{"text": t} for t in texts[:n]],
                "tag filter": ([{"text": "dry kick drum", "tags": "folder07"}] * n),
            }
            http_search(port, "text=dry+kick+drum")  # warm: the cached text is cached
            for name, queries in cases.items():
                times = []
                for q in queries:
                    if name == "new text":
                        q = {"text": q["text"] + " http"}
                    started = time.perf_counter()
                    body = http_search(port, urllib.parse.urlencode({**q, "top_k": 15}))
                    times.append(time.perf_counter() - started)
                    assert body["count"] == min(15, args.items // 100 if "tags" in q else 15)
                rows.append({"path": "HTTP /api/search", "case": name, **summary(times)})
                messages = [{"op": "search", "top_k": 15, "text": q["text"] + (" ws" if name == "new text" else ""),
                             **({"tags": [q["tags"]]} if "tags" in q else {})} for q in queries]
                rows.append({"path": "WebSocket search", "case": name,
                             **summary(asyncio.run(ws_searches(port, messages)))})
        finally:
            server.stop()
    meta = {"machine": machine(), "items": args.items, "date": time.strftime("%Y-%m-%d"), "page_bytes": page,
            "model": "untrained HTSAT-tiny (costs what trained weights cost)"}
    (out / "web.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Search from the page's paths ({args.items:,} items)", "",
             f"Machine: {meta['machine']}; {meta['date']}; model: {meta['model']}.",
             f"Page first load: {page:,} bytes (all from the server).", "",
             "| path | case | p50 ms | p99 ms | requests |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['case']} | {r['p50_ms']} | {r['p99_ms']} | {r['requests']} |" for r in rows]
    http = {r["case"]: r["p50_ms"] for r in rows if r["path"].startswith("HTTP")}
    ws = {r["case"]: r["p50_ms"] for r in rows if r["path"].startswith("Web")}
    lines += ["", "p50 ratio HTTP / WebSocket: " + ", ".join(f"{c} {http[c] / ws[c]:.2f}x" for c in http)]
    (out / "web.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"median of rows' p50: {statistics.median(r['p50_ms'] for r in rows)} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
