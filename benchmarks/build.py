"""An incremental library rebuild with nothing changed, at 20k and 100k known items: it must grow linearly.

    python benchmarks/build.py                    # 20,000 and 100,000 items
    python benchmarks/build.py --sizes 5000 20000

For each size it writes that many small files in 100 folders and a library
that already holds them all (same sizes and modification times, synthetic
embeddings), then times ``clap-ws library build`` on the folder again: the
scan and plan, no decoding, and no model (a rebuild with nothing to embed
never loads one). Reported: seconds, and microseconds per item, which stays
flat when the plan is linear (it was quadratic: the dropped-file count rebuilt
a set of every path for every known item).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from latency import ROOT, machine

from clap_ws.build import build
from clap_ws.search.index import VectorIndex
from clap_ws.search.library import Library
from clap_ws.similarity import unit


def prepare(n: int, root: Path, out: Path) -> None:
    items = []
    for i in range(n):
        rel = f"folder{i % 100:02d}/sound{i:06d}.wav"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        stat = path.stat()
        items.append({"path": rel, "duration": 1.0, "sample_rate": 48000, "channels": 1, "sha256": f"{i:064x}",
                      "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "tags": [f"folder{i % 100:02d}"]})
    vectors = unit(np.random.default_rng(0).standard_normal((n, 512)).astype(np.float32))
    model = {"name": "untrained", "sha256": None, "seed": 0, "architecture": "HTSAT-tiny"}
    Library(out.name, model, items, VectorIndex(vectors, "flat"), str(root.resolve())).save(out)


def no_model():
    raise AssertionError("a rebuild with nothing to embed loaded the model")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root, out = Path(tmp) / "sounds", Path(tmp) / "lib.npz"
            prepare(n, root, out)
            started = time.perf_counter()
            report = build(no_model, root, out, progress=False)
            seconds = time.perf_counter() - started
            assert report.embedded == 0 and report.reused == n and report.total == n
            rows.append({"items": n, "seconds": round(seconds, 3), "us_per_item": round(1e6 * seconds / n, 1)})
            print(rows[-1])
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "build.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Incremental rebuild, nothing changed", "", f"Machine: {meta['machine']}; {meta['date']}.", "",
             "| known items | seconds | µs per item |", "|---:|---:|---:|"]
    lines += [f"| {r['items']:,} | {r['seconds']} | {r['us_per_item']} |" for r in rows]
    (out_dir / "build.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
