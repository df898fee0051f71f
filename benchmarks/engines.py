"""Other inference engines against torch for the audio encoder on the CPU: would one pay to adopt?

    pip install -e '.[engines]'
    python benchmarks/engines.py                  # 3 rounds of 30 calls per engine, 1 window per call
    python benchmarks/engines.py --windows 4      # 4 windows per call, as under load

What runs: HTSAT after its spectrogram front end (``bn0``, the time-frequency
image, the Swin transformer with clap-ws's inference forwards, the
projection), the part that costs 95 % of a window; the front end stays in
torch (``benchmarks/engine_parts.py`` times it in OpenVINO). All engines get
the same log-mel input, computed once from chirps.

Engines, with the same untrained weights:

* ``torch fp32`` - clap-ws's fp32 model (weights packed for oneDNN), what a
  CPU without native bf16 runs; the baseline of the ratios;
* ``torch auto`` - clap-ws's default precision on this machine (bf16 where
  the CPU has it);
* ``onnxruntime fp32`` - the fp32 network exported with ``torch.onnx``
  (dynamo), run by ONNX Runtime's CPU provider with all graph optimisations;
* ``openvino fp32`` and ``openvino auto`` - the same ONNX file compiled by
  OpenVINO for the CPU (latency hint), in fp32 and in clap-ws's ``auto``
  precision (bf16 where the CPU has it natively, see ``clap_ws.cpu``).

Every engine gets as many threads as torch uses here. Each runs in a process
of its own: two thread pools in one process slow each other on a small
machine. The engines take turns, round after round, so drift on a shared host
hits all of them alike; the table gives each engine's median over all its
calls, its ratio to ``torch fp32`` (the median of the per-round ratios), and
the cosine of its embeddings to ``torch fp32``'s. Results go to ``--out`` as
engines.json and engines.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from latency import ROOT, machine

ENGINES = ["torch fp32", "torch auto", "onnxruntime fp32", "openvino fp32", "openvino auto"]
BASELINE = ENGINES[0]


# ---- workers (each in its own process) ---------------------------------------------------
def export(folder: Path, windows: int) -> dict:
    """Write the log-mel input and the fp32 network as ONNX into ``folder``."""
    import torch

    from clap_ws.constants import WINDOW_SAMPLES
    from clap_ws.model import ClapModel
    from clap_ws.model.openvino_audio import export_onnx
    from clap_ws.model.towers import AudioBody, FrontEnd

    model = ClapModel.untrained(precision="fp32")  # this process builds and runs it: one OpenMP pool
    t = np.arange(WINDOW_SAMPLES) / 48000
    chirps = [0.4 * np.sin(2 * np.pi * ((100 + 50 * i) * t + 300 * t * t)) for i in range(windows)]
    with torch.inference_mode():
        mel = FrontEnd(model.net.audio_branch)(torch.from_numpy(np.stack(chirps).astype(np.float32))).float()
    np.save(folder / "mel.npy", mel.numpy())
    started = time.perf_counter()
    export_onnx(AudioBody.of(model.net), mel.clone(), folder / "audio.onnx")  # unpacked: ONNX knows no packed ops
    return {"export_s": time.perf_counter() - started}


def run_engine(engine: str, folder: Path, iterations: int) -> dict:
    """Time ``iterations`` calls of one engine on the saved input; save its embeddings."""
    mel = np.load(folder / "mel.npy")
    if engine.startswith("openvino"):
        import openvino as ov
        import torch

        from clap_ws.cpu import has_native_bf16

        # auto is clap-ws's choice, not OpenVINO's: OpenVINO reads the CPU's flags, not ONEDNN_MAX_CPU_ISA
        native = has_native_bf16() and not engine.endswith("fp32")
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                  "INFERENCE_PRECISION_HINT": "bf16" if native else "f32"}
        compiled = ov.Core().compile_model(str(folder / "audio.onnx"), "CPU", config)
        request = compiled.create_infer_request()
        precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32, bf16
        label = engine if engine.endswith("fp32") else f"{engine} ({precision})"
        return _time(engine, label, lambda: request.infer({0: mel})[0].copy(), folder, iterations)
    if engine.startswith("onnxruntime"):
        import onnxruntime as ort
        import torch

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # what torch would use here
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(folder / "audio.onnx"), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        call = lambda: session.run(None, {name: mel})[0]  # noqa: E731
        return _time(engine, engine, call, folder, iterations)
    import torch

    from clap_ws.model import ClapModel

    model = ClapModel.untrained(precision=engine.split()[1])
    body = model.audio_body
    x = torch.from_numpy(mel).to(model.net.audio_branch.bn0.weight.dtype)

    def call():
        with torch.inference_mode():
            return body(x).float().numpy()

    label = engine if engine.endswith(model.precision) else f"{engine} ({model.precision})"
    return _time(engine, label, call, folder, iterations)


def _saved(folder: Path, engine: str) -> Path:
    """Where a worker leaves ``engine``'s embeddings."""
    return folder / f"{engine.replace(' ', '_')}.npy"


def _time(engine: str, label: str, call, folder: Path, iterations: int) -> dict:
    out = call()  # first-call setup is not timed
    call()
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    np.save(_saved(folder, engine), np.asarray(out, dtype=np.float32))
    return {"label": label, "ms": times}


# ---- the driver ----------------------------------------------------------------------------
def _worker(args: list[str]) -> dict:
    command = [sys.executable, __file__, "--worker", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_ARENA_MAX=os.environ.get("MALLOC_ARENA_MAX", "2"))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest per-window cosine between two sets of embeddings."""
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def summarise(per_round: list[dict[str, dict]], folder: Path, windows: int) -> list[dict]:
    reference = np.load(_saved(folder, BASELINE))
    rows = []
    for engine in ENGINES:
        per_window = [np.median(r[engine]["ms"]) / windows for r in per_round]
        base = [np.median(r[BASELINE]["ms"]) / windows for r in per_round]
        rows.append({
            "engine": per_round[0][engine]["label"],
            "ms_per_window_p50": float(np.median(np.concatenate([r[engine]["ms"] for r in per_round])) / windows),
            "rounds_ms": [round(float(x), 1) for x in per_window],
            "x_torch_fp32": float(np.median(np.array(per_window) / np.array(base))),
            "cosine_to_torch_fp32": cosine(np.load(_saved(folder, engine)), reference),
        })
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Machine: {meta['machine']}. {meta['date']}. Untrained HTSAT-tiny after the spectrogram front end, "
             f"{meta['windows']} window(s) per call, {meta['rounds']} rounds of {meta['iterations']} calls per engine.",
             "", "| engine | ms per window p50 | per round | time vs torch fp32 | cosine to torch fp32 |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['ms_per_window_p50']:.1f} | {', '.join(map(str, r['rounds_ms']))} | "
                     f"{r['x_torch_fp32']:.2f}x | {r['cosine_to_torch_fp32']:.6f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=30, help="timed calls per engine per round")
    parser.add_argument("--windows", type=int, default=1, help="10-s windows per call")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, folder = args.worker[0], Path(args.worker[1])
        result = export(folder, int(args.worker[2])) if kind == "export" else \
            run_engine(kind, folder, int(args.worker[2]))
        print(json.dumps(result))
        return 0
    missing = [m for m in ("onnxruntime", "onnx", "onnxscript", "openvino") if not _importable(m)]
    if missing:
        parser.error(f"needs {', '.join(missing)}: pip install -e '.[engines]'")
    with tempfile.TemporaryDirectory(prefix="clap-ws-engines-") as tmp:
        folder = Path(tmp)
        exported = _worker(["export", str(folder), str(args.windows)])
        print(f"exported the fp32 audio encoder in {exported['export_s']:.0f} s", flush=True)
        per_round = []
        for round_ in range(1, args.rounds + 1):
            per_round.append({})
            for engine in ENGINES:
                result = _worker([engine, str(folder), str(args.iterations)])
                per_round[-1][engine] = result
                print(f"round {round_}: {result['label']:28s} {np.median(result['ms']) / args.windows:7.1f} ms "
                      "per window", flush=True)
        rows = summarise(per_round, folder, args.windows)
    meta = {"machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "windows": args.windows,
            "rounds": args.rounds, "iterations": args.iterations, "export_s": exported["export_s"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    (out / "engines.md").write_text(markdown(rows, meta))
    print("\n" + markdown(rows, meta))
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
