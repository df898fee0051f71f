"""The parts of CLAP that ``--engine openvino`` leaves to torch, timed in OpenVINO: would either pay?

    python benchmarks/engine_parts.py                     # this CPU's default precision (bf16 where native)
    python benchmarks/engine_parts.py --precision fp32

Two parts stay in torch whatever the engine: the spectrogram front end
(:class:`~clap_ws.model.towers.FrontEnd`: ``torch.stft`` and the log-mel, always
fp32) and the text tower (RoBERTa and its projection). Each is exported with
``torch.onnx`` (dynamo) from the fp32 weights, compiled by OpenVINO for the CPU
(latency hint, as many threads as torch) and timed against torch in the same
process, calls alternating: the front end on 1 and 4 windows of noise, the text
tower on 1 and 8 prompts, tokenising and normalising included on both sides.
Reports medians, the ratio to torch and the agreement (front end: largest
difference of log-mel values; text: worst cosine to torch fp32), with the CPU
class. Writes ``engine_parts.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clap_ws.constants import WINDOW_SAMPLES
from clap_ws.cpu import describe
from clap_ws.model import ClapModel
from clap_ws.model.clap import resolve_precision
from clap_ws.model.openvino_audio import _PRECISION, export_onnx
from clap_ws.model.tokenizer import tokenize

ROOT = Path(__file__).resolve().parent.parent


def timed(calls: dict, rounds: int) -> dict[str, float]:
    """Median ms of each of ``calls`` (name -> function), after one warm-up call each, in alternating rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: this CPU's")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    import openvino

    precision = args.precision or resolve_precision("auto", torch.device("cpu"))
    reference = ClapModel.untrained(precision="fp32", pack=False)  # what is exported
    served = ClapModel.untrained(precision=precision)  # what torch serves in that precision
    core = openvino.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
              "INFERENCE_PRECISION_HINT": _PRECISION[precision]}
    rows = []
    with tempfile.TemporaryDirectory(prefix="clap-ws-parts-") as folder:
        front_end = reference._front_end.eval()
        for windows in (1, 4):
            wave = torch.from_numpy((0.3 * np.random.default_rng(windows).standard_normal(
                (windows, WINDOW_SAMPLES))).astype(np.float32))
            path = Path(folder) / f"front_end{windows}.onnx"
            export_onnx(front_end, wave, path, ({},))  # static: OpenVINO reads ONNX's STFT of static shapes only
            request = core.compile_model(core.read_model(str(path)), "CPU",
                                         {**config, "INFERENCE_PRECISION_HINT": "f32"})
            request = request.create_infer_request()
            with torch.inference_mode():
                truth = front_end(wave).numpy()
                ms = timed({"torch": lambda w=wave: front_end(w),
                            "openvino": lambda w=wave, r=request: r.infer({0: w.numpy()})}, args.rounds)
            diff = float(np.abs(request.infer({0: wave.numpy()})[0] - truth).max())
            rows.append((f"front end, {windows} window(s)", "fp32 (always)", ms, f"max abs diff {diff:.1e}"))

        tower = reference._text.eval()
        texts = [f"a dog barking number {i} in a large hall" for i in range(8)]
        tokens = tokenize(reference.tokenizer, texts, reference.max_tokens)
        path = Path(folder) / "text.onnx"
        batch, length = torch.export.Dim("texts", min=1, max=64), torch.export.Dim("tokens", min=2, max=512)
        export_onnx(tower, (tokens["input_ids"], tokens["attention_mask"]), path,
                    ({0: batch, 1: length}, {0: batch, 1: length}))
        request = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()

        def openvino_text(batch):
            ids = tokenize(reference.tokenizer, batch, reference.max_tokens)
            raw = request.infer({0: ids["input_ids"].numpy(), 1: ids["attention_mask"].numpy()})[0]
            return raw / np.linalg.norm(raw, axis=-1, keepdims=True)

        for count in (1, 8):
            batch = texts[:count]
            truth = reference.embed_text(batch)
            ms = timed({"torch": lambda b=batch: served.embed_text(b), "openvino": lambda b=batch: openvino_text(b)},
                       args.rounds)
            cosine = float((openvino_text(batch) * truth).sum(-1).min())
            rows.append((f"text tower, {count} prompt(s)", precision, ms, f"cosine to torch fp32 {cosine:.6f}"))
    lines = [f"{describe()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; untrained HTSAT-tiny and "
             f"RoBERTa, OpenVINO {openvino.__version__.split('-')[0]}, medians of {args.rounds} alternating calls", "",
             "| part | precision | torch ms | OpenVINO ms | OpenVINO / torch | agreement |",
             "|---|---|---|---|---|---|"]
    for part, prec, ms, agreement in rows:
        lines.append(f"| {part} | {prec} | {ms['torch']:.2f} | {ms['openvino']:.2f} | "
                     f"{ms['openvino'] / ms['torch']:.2f}x | {agreement} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_parts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
