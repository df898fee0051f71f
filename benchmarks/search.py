"""Library search speed: exact (flat) and HNSW top-10 over synthetic libraries.

    python benchmarks/search.py                      # 100k items
    python benchmarks/search.py --sizes 100000 1000000

Synthetic embeddings have a low intrinsic dimension, as CLAP's do (24 latent
dimensions mapped to 512, plus noise), and queries lie near, not on, library
items. For each size it reports build time, p50/p99 latency of one top-10
query (what a server request costs) and recall@10 against the baseline in the
same run: ``f32 scan``, a plain float32 scan (one BLAS product, what ``flat``
was before its int8 pre-scan). ``flat`` must reach recall 1.000: it is exact.
Torch runs serially, as on the server's index thread (see
``clap_ws.scan.single_threaded``); numpy's BLAS keeps its threads.
Uses clap-ws's own VectorIndex, as the server does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from clap_ws.index import VectorIndex
from clap_ws.scan import ExactScan, single_threaded
from clap_ws.similarity import unit

ROOT = Path(__file__).resolve().parent.parent


def synthetic(n: int, queries: int, latent: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((latent, 512)).astype("f4")
    vectors = np.empty((n, 512), np.float32)
    z_all = rng.standard_normal((n, latent)).astype("f4")
    for start in range(0, n, 100_000):  # in chunks: 1M x 512 floats is 2 GB already
        z = z_all[start : start + 100_000]
        vectors[start : start + len(z)] = unit(z @ basis + 0.15 * np.sqrt(latent) * rng.standard_normal((len(z), 512)).astype("f4"))
    picks = rng.integers(0, n, queries)
    q = unit((z_all[picks] + 0.3 * rng.standard_normal((queries, latent)).astype("f4")) @ basis)
    return vectors, q


def time_queries(index: VectorIndex, queries: np.ndarray, k: int = 10):
    times, ids = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, i = index.search(q[None], k)
        times.append((time.perf_counter() - t0) * 1000)
        ids.append(i[0])
    return np.array(times), np.array(ids)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    single_threaded()  # torch as on the server's index thread: serial, beside the model (numpy's BLAS unchanged)
    rows = []
    for n in args.sizes:
        vectors, queries = synthetic(n, args.queries)
        for kind in ("f32 scan", "flat", "hnsw"):
            t0 = time.perf_counter()
            index = ExactScan(vectors, quantize=False) if kind == "f32 scan" else VectorIndex(vectors, kind)
            build_s = time.perf_counter() - t0
            times, ids = time_queries(index, queries)
            rows.append({"items": n, "index": kind, "build_s": build_s, "p50_ms": float(np.median(times)),
                         "p99_ms": float(np.percentile(times, 99)), "ids": ids})
            print(f"{n:>9} {kind:8s} build {build_s:7.1f} s  top-10 p50 {rows[-1]['p50_ms']:.3f} ms  "
                  f"p99 {rows[-1]['p99_ms']:.3f} ms", flush=True)
            del index
        exact = next(r["ids"] for r in rows if r["items"] == n and r["index"] == "f32 scan")
        for r in rows:
            if r["items"] == n:
                r["recall_at_10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, r["ids"])]))
        del vectors
    for r in rows:
        r.pop("ids")
    cpu = platform.processor() or platform.machine()
    meta = {"machine": f"{cpu}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "queries": args.queries}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    lines = ["| items | index | build s | top-10 p50 ms | p99 ms | recall@10 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['items']:,} | {r['index']} | {r['build_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['recall_at_10']:.3f} |" for r in rows]
    (out / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
