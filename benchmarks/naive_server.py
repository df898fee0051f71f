"""The baseline: CLAP served the naive way, as the service clap-ws replaces did it.

One clip at a time, run on the event loop (which blocks while the model
runs), fp32, every clip peak-normalised, one reply per connection. It uses
clap-ws's model and audio code so the comparison measures serving, not a
different model or resampler; but its matmuls run as laion-clap's do, with
weights not packed for oneDNN (that is part of what clap-ws does).

    python benchmarks/naive_server.py --port 0 [--untrained | --checkpoint PATH]
"""

import argparse
import asyncio
import json
import logging
import time
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from websockets.asyncio.server import serve

from clap_ws.audio import AudioSpec, load, windows
from clap_ws.cli import add_model_options, model_from_args
from clap_ws.inference import AudioJob, Inference


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=32052)
    add_model_options(parser)
    args = parser.parse_args()
    args.precision = "fp32"
    model = model_from_args(args).variant(pack=False)  # plain linears, as a general server runs them
    infer = Inference(model)

    async def handler(ws):
        query = dict(parse_qsl(urlsplit(ws.request.path).query))
        spec = AudioSpec(sample_rate=float(query.get("sample_rate", 48000)), normalize="peak")
        async for message in ws:
            started = time.perf_counter()
            (result,) = infer([AudioJob([windows(load(message, spec, 600))])])  # blocks the loop
            embedding = np.asarray(result.embeddings[0], dtype=np.float64).tolist()
            elapsed = time.perf_counter() - started
            await ws.send(json.dumps({"status": "received standalone audio", "features": embedding,
                                      "embedding": embedding, "type": "clap", "time": elapsed,
                                      "extraction_time_ms": elapsed * 1000, "model_ms": result.model_ms}))

    async with serve(handler, "127.0.0.1", args.port, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        logging.warning("naive server listening on ws://127.0.0.1:%d/clap", port)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
