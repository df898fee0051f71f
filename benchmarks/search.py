"""Library search speed: exact (flat) and HNSW top-10 over synthetic libraries.

    python benchmarks/search.py                      # 100k items
    python benchmarks/search.py --sizes 100000 1000000

Synthetic embeddings have a low intrinsic dimension, as CLAP's do (24 latent
dimensions mapped to 512, plus noise), and queries lie near, not on, library
items. For each size it reports build time, p50/p99 latency of one top-10
query (what a server request costs) and recall@10 against the baseline in the
same run: ``f32 scan``, a plain float32 scan (one BLAS product, what ``flat``
was before its int8 pre-scans). ``flat`` must reach recall 1.000: it is exact.
``--data random`` uses uniformly random unit vectors and queries instead: the
worst case for exact search, where no item stands out and no dimension can be
skipped. For ``flat`` it also reports which share of queries the leading-
dimension first pass answered (see ``clap_ws.search.scan``) and which pre-scan kernel ran
(``int8``, or ``int8-7bit`` on CPUs without VNNI). Every report names the CPU's
instruction set: run it as an AVX2 CPU with ``ONEDNN_MAX_CPU_ISA=AVX2``. Torch
runs serially, as on the server's index thread (see
``clap_ws.search.scan.single_threaded``); numpy's BLAS keeps its threads.
Uses clap-ws's own VectorIndex, as the server does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from latency import ROOT, machine

from clap_ws.cpu import instruction_set
from clap_ws.search.index import VectorIndex
from clap_ws.search.scan import ExactScan, single_threaded
from clap_ws.similarity import unit


def synthetic(n: int, queries: int, latent: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((latent, 512)).astype("f4")
    vectors = np.empty((n, 512), np.float32)
    z_all = rng.standard_normal((n, latent)).astype("f4")
    for start in range(0, n, 100_000):  # in chunks: 1M x 512 floats is 2 GB already
        z = z_all[start : start + 100_000]
        noise = rng.standard_normal((len(z), 512)).astype("f4")
        vectors[start : start + len(z)] = unit(z @ basis + 0.15 * np.sqrt(latent) * noise)
    picks = rng.integers(0, n, queries)
    q = unit((z_all[picks] + 0.3 * rng.standard_normal((queries, latent)).astype("f4")) @ basis)
    return vectors, q


def uniform(n: int, queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = np.empty((n, 512), np.float32)
    for start in range(0, n, 100_000):
        vectors[start : start + 100_000] = unit(rng.standard_normal((min(100_000, n - start), 512)).astype("f4"))
    return vectors, unit(rng.standard_normal((queries, 512)).astype("f4"))


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
    parser.add_argument("--data", choices=["embeddings", "random"], default="embeddings",
                        help="CLAP-like synthetic embeddings (default) or uniformly random unit vectors")
    parser.add_argument("--indexes", nargs="+", choices=["f32 scan", "flat", "hnsw"],
                        default=["f32 scan", "flat", "hnsw"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    single_threaded()  # torch as on the server's index thread: serial, beside the model (numpy's BLAS unchanged)
    rows = []
    for n in args.sizes:
        vectors, queries = (synthetic if args.data == "embeddings" else uniform)(n, args.queries)
        for kind in ["f32 scan"] + [k for k in args.indexes if k != "f32 scan"]:  # the baseline always runs
            t0 = time.perf_counter()
            index = ExactScan(vectors, quantize=False) if kind == "f32 scan" else VectorIndex(vectors, kind)
            if kind == "flat":
                index.scan.pack()  # part of the build: otherwise the first search would pack
            build_s = time.perf_counter() - t0
            times, ids = time_queries(index, queries)
            answered = index.scan.answered if kind == "flat" else {}
            rows.append({"items": n, "data": args.data, "index": kind, "build_s": build_s,
                         "p50_ms": float(np.median(times)), "p99_ms": float(np.percentile(times, 99)), "ids": ids,
                         "first_pass": answered.get("lead", 0) / len(queries) if kind == "flat" else None,
                         "prescan": index.scan.prescan if kind == "flat" else None})
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
    meta = {"machine": machine(), "cpu": instruction_set(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "queries": args.queries}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    lines = [f"{meta['machine']} ({meta['date']}); exact pre-scan kernel: "
             f"{next((r['prescan'] for r in rows if r['prescan']), 'not run')}", "",
             "| items | data | index | build s | top-10 p50 ms | p99 ms | recall@10 | first pass answered |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['items']:,} | {r['data']} | {r['index']} | {r['build_s']:.1f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['recall_at_10']:.3f} | "
              f"{'' if r['first_pass'] is None else format(r['first_pass'], '.0%')} |" for r in rows]
    (out / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
