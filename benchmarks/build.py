"""Library builds: an incremental rebuild with nothing changed at 20k and 100k known items (it must grow
linearly), and a fresh build locally against 2 Ray workers on the same files.

    python benchmarks/build.py                    # 20,000 and 100,000 items; 48 files local vs Ray
    python benchmarks/build.py --sizes 5000 20000 --ray-files 0

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
from clap_ws.search.index import VectorIndex, choose_kind
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
    items.sort(key=lambda item: item["path"])  # in scan order, as a build writes them
    vectors = unit(np.random.default_rng(0).standard_normal((n, 512)).astype(np.float32))
    model = {"name": "untrained", "sha256": None, "seed": 0, "architecture": "HTSAT-tiny"}
    kind = choose_kind(n)  # what a build of this size makes (HNSW from 30,000 items)
    Library(out.name, model, items, VectorIndex(vectors, kind), str(root.resolve())).save(out)


def ray_against_local(n: int, workers: int) -> dict:
    """Seconds to build ``n`` 2-s files locally and on ``workers`` local Ray actors (fp32, untrained weights)."""
    import ray
    import soundfile as sf
    from latency import sound

    from clap_ws.model import ClapModel
    from clap_ws.model.checkpoint import Architecture
    from clap_ws.ray_build import RayEmbedder

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sounds"
        for i in range(n):
            (root / f"k{i % 4}").mkdir(parents=True, exist_ok=True)
            sf.write(root / f"k{i % 4}" / f"s{i:04d}.wav", sound(2.0, 44100, i), 44100)
        model = ClapModel.untrained(Architecture("HTSAT-tiny"), seed=0, precision="fp32")
        started = time.perf_counter()
        build(model, root, Path(tmp) / "local.npz", batch=8, progress=False)
        out["local_s"] = time.perf_counter() - started
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            started = time.perf_counter()  # includes starting the actors and loading their models
            embedder = RayEmbedder({"untrained": True, "precision": "fp32"}, 600.0, workers=workers)
            build(model, root, Path(tmp) / "ray.npz", batch=8, progress=False, embedder=embedder)
            out["ray_s"] = time.perf_counter() - started
            embedder.close()
        finally:
            ray.shutdown()
    return {"files": n, "workers": workers, **{k: round(v, 2) for k, v in out.items()},
            "speedup": round(out["local_s"] / out["ray_s"], 2)}


def no_model():
    raise AssertionError("a rebuild with nothing to embed loaded the model")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--ray-files", type=int, default=48, help="files for local vs Ray (0: skip)")
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
    ray_row = ray_against_local(args.ray_files, 2) if args.ray_files else None
    print(ray_row)
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "build.json").write_text(json.dumps({"meta": meta, "rows": rows, "ray": ray_row}, indent=2))
    lines = ["# Incremental rebuild, nothing changed", "", f"Machine: {meta['machine']}; {meta['date']}.", "",
             "| known items | seconds | µs per item |", "|---:|---:|---:|"]
    lines += [f"| {r['items']:,} | {r['seconds']} | {r['us_per_item']} |" for r in rows]
    if ray_row:
        lines += ["", f"A fresh build of {ray_row['files']} files of 2 s: locally {ray_row['local_s']} s, on "
                      f"{ray_row['workers']} local Ray workers {ray_row['ray_s']} s (starting them and loading their "
                      f"models included): {ray_row['speedup']}x."]
    (out_dir / "build.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
