"""``clap-ws`` (also ``python -m clap_ws``): one command, several subcommands.

* ``serve``    - load the model and serve WebSocket clients until SIGINT/SIGTERM;
* ``library build DIR --out LIB`` / ``library info LIB`` - sound libraries;
* ``download`` - fetch a published checkpoint and the tokenizer files (the
  only subcommand that touches the network).

Every subcommand that loads a model takes the same model options
(:func:`add_model_options`), and server defaults come from
:class:`~clap_ws.server.ServerConfig`, so they are written down once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields, replace
from pathlib import Path

from . import __version__
from .errors import ClapError, ModelError
from .model.clap import ENGINES, PRECISIONS
from .model.weights import (
    DEFAULT_CHECKPOINT,
    KNOWN_CHECKPOINTS,
    cache_dir,
    download,
    load_model,
)
from .search.index import HNSW_THRESHOLD

_SERVER_HELP = {
    "host": "address to bind (default %(default)s; loopback only)",
    "port": "TCP port (default %(default)s; 0 picks a free one)",
    "sample_rate": "sample rate of binary frames without ?sample_rate= (default %(default)s)",
    "max_seconds": "longest clip accepted, in seconds (default %(default)s)",
    "max_batch": "most requests gathered into one batch (default %(default)s)",
    "max_wait_ms": "how long a batch waits for more requests (default %(default)s ms)",
    "max_batch_ms": "latency target: a batch holds about this much model time (measured per window), or one "
                    "request of every waiting connection if that is more, so a newcomer is never stuck behind a "
                    "long batch (default %(default)s; 0: batches of up to --max-batch)",
    "max_queue": "units of work (10-s audio windows and texts) waiting for the model before replies are `busy` "
                 "(default %(default)s)",
    "max_items": "most buffers, embeddings, texts, prompts or references in one request (default %(default)s)",
    "max_frame_mb": "largest WebSocket frame in MiB; larger closes with 1009 (default %(default)s)",
    "max_pipeline": "unanswered requests per connection before it stops being read (default %(default)s)",
    "max_pending_mb": "MiB of finished replies a connection has not taken before it stops being read "
                      "(default %(default)s)",
    "max_connections": "open connections before new ones close with 1013 (default %(default)s)",
    "ping_interval": "seconds between keepalive pings (default %(default)s)",
    "ping_timeout": "seconds to wait for a pong before dropping a client (default %(default)s)",
    "shutdown_timeout": "seconds in-flight requests get to finish on SIGTERM (default %(default)s)",
    "text_cache": "prompt embeddings kept in the LRU cache (default %(default)s)",
    "audio_cache": "sound embeddings kept by content (samples, rate, channels, options, model), about 2 KB each: "
                   "a repeated sound skips the model (default %(default)s; 0: off)",
    "token": "clients and the HTTP API must send it (Authorization: Bearer TOKEN, or ?token=); the page asks for "
             "it; default $CLAP_WS_TOKEN",
    "allowed_origins": "browser Origin allowed to connect besides the server's own (repeat for several); "
                       "clients without an Origin are never refused",
    "archive_flush_s": "seconds between writes of changed archives to --archive-dir (default %(default)s)",
    "metrics_token": "GET /metrics needs --token too (default: open, like /health: it holds counters only)",
    "library_poll_s": "seconds between checks of --library files for a rebuild, picked up without a restart "
                      "(default %(default)s; 0: never)",
}
_SERVER_FLAGS = {"warm_up": "--no-warm-up"}  # booleans that default to True


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", metavar="PATH",
                       help=f"LAION-CLAP checkpoint (.pt) or transformers CLAP folder (config.json, weights, "
                            f"tokenizer); default $CLAP_CHECKPOINT_PATH, else <cache>/{DEFAULT_CHECKPOINT}")
    group.add_argument("--model", metavar="ORG/NAME",
                       help="a transformers CLAP model in the local Hugging Face cache, e.g. "
                            "laion/larger_clap_general (offline; default $CLAP_MODEL; HF_HOME and HF_HUB_CACHE "
                            "honoured; fetch with `clap-ws download ORG/NAME`)")
    group.add_argument("--untrained", action="store_true",
                       help="random weights, same architecture: for tests and latency work only")
    group.add_argument("--seed", type=int, default=0, help="seed of --untrained weights (default 0)")
    group.add_argument("--audio-model", default="HTSAT-tiny", choices=["HTSAT-tiny", "HTSAT-base", "HTSAT-large"],
                       help="audio architecture of --untrained weights (HTSAT-tiny, -base or -large; a checkpoint's "
                            "is read from the file)")
    group.add_argument("--device", help="cuda, cuda:1, mps or cpu (default $CLAP_DEVICE, else auto)")
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32")
    group.add_argument("--chunk", type=int, default=0, metavar="N",
                       help="windows per network call (default auto: 4 on a CPU, 32 on a GPU)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the audio and text towers at warm-up: less audio time per window on "
                            "a CPU, for minutes of compiling at start (docs/performance.md)")
    group.add_argument("--engine", default=os.environ.get("CLAP_WS_ENGINE", "auto"), choices=["auto", *ENGINES],
                       help="what runs the audio encoder (default $CLAP_WS_ENGINE, else auto): auto measures "
                            "torch and OpenVINO on this CPU and this model at start and serves with the faster "
                            "(info's engine_auto has the times); torch; or openvino: compiled by OpenVINO after "
                            "the spectrogram (CPU, non-fusion; its export and compiled code are kept in "
                            "<cache>/engines or $CLAP_WS_ENGINE_CACHE, so a restart skips them)")
    group.add_argument("--cache-dir", help="where checkpoints live (default $CLAP_WS_CACHE_DIR or ~/.cache/clap-ws)")
    group.add_argument("--tokenizer", metavar="DIR",
                       help="roberta-base tokenizer folder (default $CLAP_TOKENIZER_DIR, the cache, the HF cache)")
    group.add_argument("--allow-pickle", action="store_true",
                       help="load checkpoints holding non-tensor objects (runs pickle code: trusted files only)")


def model_options(args: argparse.Namespace) -> dict:
    """The model options as :func:`~clap_ws.model.weights.load_model` takes them (also sent to Ray workers)."""
    return {"checkpoint": args.checkpoint, "repo_id": args.model, "untrained": args.untrained, "seed": args.seed,
            "audio_model": args.audio_model, "device": args.device, "precision": args.precision, "chunk": args.chunk,
            "compile": args.compile, "engine": args.engine, "cache": args.cache_dir,
            "tokenizer_dir": args.tokenizer, "allow_pickle": args.allow_pickle}


def model_from_args(args: argparse.Namespace, download_missing: bool = False):
    return load_model(**model_options(args), download_missing=download_missing)


def build_parser() -> argparse.ArgumentParser:
    from .server import ServerConfig

    parser = argparse.ArgumentParser(prog="clap-ws", description="LAION-CLAP embeddings over WebSocket")
    parser.add_argument("--version", action="version", version=f"clap-ws {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="what the log shows (default %(default)s; per-connection lines and each error reply "
                             "only at DEBUG)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text lines, or one JSON object per line for log shippers (default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve embeddings over WebSocket, and the search page and HTTP API")
    add_model_options(serve)
    group = serve.add_argument_group("server")
    for f in fields(ServerConfig):
        if f.name == "token":
            group.add_argument("--token", default=os.environ.get("CLAP_WS_TOKEN"), help=_SERVER_HELP["token"])
        elif f.name == "allowed_origins":
            group.add_argument("--allowed-origin", dest="allowed_origins", action="append", default=[],
                               metavar="ORIGIN", help=_SERVER_HELP["allowed_origins"])
        elif f.default is False:
            group.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=_SERVER_HELP[f.name])
        elif f.name in _SERVER_FLAGS:
            group.add_argument(_SERVER_FLAGS[f.name], dest=f.name, action="store_false",
                               help="skip the warm-up model call before listening")
        else:
            group.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                               help=_SERVER_HELP[f.name])
    group.add_argument("--insecure", action="store_true",
                       help="allow binding a non-loopback address without --token")
    group.add_argument("--download", action="store_true",
                       help="fetch the default checkpoint and tokenizer (or --model) first if missing (network)")
    extra = serve.add_argument_group("libraries, archives, behaviour descriptors")
    extra.add_argument("--library", action="append", default=[], metavar="FILE",
                       help="a library built by `clap-ws library build` (repeat for several)")
    extra.add_argument("--archive-dir", metavar="DIR", help="persist named archives here (default: in memory)")
    extra.add_argument("--projection", metavar="FILE",
                       help="behaviour-descriptor projection (.npz PCA/linear, or TorchScript) for /clap-bd")

    lib = sub.add_parser("library", help="build and inspect sound libraries")
    lib_sub = lib.add_subparsers(dest="library_command", required=True)
    build = lib_sub.add_parser("build", help="embed every audio file below DIR into the library file LIB")
    build.add_argument("folder", metavar="DIR")
    build.add_argument("--out", required=True, metavar="LIB", help="library file to create or update")
    build.add_argument("--batch", type=int, default=16,
                       help="files per model call and journal chunk (default %(default)s)")
    build.add_argument("--index", default="auto", choices=["auto", "flat", "hnsw"],
                       help="auto: exact (flat) up to --hnsw-threshold items, HNSW above")
    build.add_argument("--hnsw-threshold", type=int, default=HNSW_THRESHOLD,
                       help="items above which auto picks HNSW (default %(default)s)")
    build.add_argument("--max-seconds", type=float, default=600.0,
                       help="skip files longer than this, in seconds (default %(default)s: a folder's recordings, "
                            "not one client's clip as with serve --max-seconds)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                       help="embed on a Ray cluster (pip install 'clap-ws[ray]'): no ADDRESS joins $RAY_ADDRESS or "
                            "starts a local one; ray://HOST:10001 reaches a remote head. Files are read by path on "
                            "the workers (shared storage) unless --ray-send-bytes")
    build.add_argument("--workers", type=int, default=2, help="Ray actors, each with one model (default 2)")
    build.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per Ray actor (default 0: CPU)")
    build.add_argument("--ray-send-bytes", action="store_true",
                       help="the driver reads each file and sends its bytes (no shared storage needed)")
    add_model_options(build)
    show = lib_sub.add_parser("info", help="print a library's summary as JSON")
    show.add_argument("lib", metavar="LIB")

    fetch = sub.add_parser("download", help="fetch a published checkpoint and the roberta-base tokenizer, or a "
                                            "transformers CLAP model (ORG/NAME) into the Hugging Face cache")
    fetch.add_argument("name", nargs="?", default=DEFAULT_CHECKPOINT,
                       help="one of: " + ", ".join(KNOWN_CHECKPOINTS) + " (default %(default)s); or ORG/NAME, "
                            "e.g. laion/larger_clap_general")
    fetch.add_argument("--cache-dir", help="destination (default $CLAP_WS_CACHE_DIR or ~/.cache/clap-ws)")
    fetch.add_argument("--timeout", type=float, default=15.0, help="seconds per network wait (default %(default)s)")
    proj = sub.add_parser("projection", help="behaviour descriptors for quality-diversity runs")
    proj_sub = proj.add_subparsers(dest="projection_command", required=True)
    pfit = proj_sub.add_parser("fit", help="fit a projection of embeddings to a few dimensions in [0, 1], for "
                                           "--projection")
    pfit.add_argument("source", metavar="SOURCE", help="a library (.npz), an archive file from --archive-dir, or an "
                                                        ".npy of (n, 512) embeddings")
    pfit.add_argument("--dims", type=int, default=6, help="behaviour dimensions (default %(default)s)")
    pfit.add_argument("--method", choices=["triplet", "pca"], default="triplet",
                      help="triplet: a small network trained with a triplet margin loss on CLAP-distance (and "
                           "--triplets) judgements (default); pca: the leading principal directions")
    pfit.add_argument("--hidden", type=int, nargs="*", default=[64], metavar="N",
                      help="hidden layer widths of the triplet network (default 64; none: linear)")
    pfit.add_argument("--triplets", metavar="FILE.jsonl",
                      help='people\'s judgements, one {"anchor", "positive", "negative"} per line, by item id or '
                           "path; they take precedence over CLAP's")
    pfit.add_argument("--epochs", type=int, default=20, help="training epochs (default %(default)s)")
    pfit.add_argument("--margin", type=float, default=0.2, help="triplet margin (default %(default)s)")
    pfit.add_argument("--fit-seed", type=int, default=0, help="seed: the same inputs give the same file")
    pfit.add_argument("--out", required=True, metavar="FILE", help="the projection file to write")

    ev = sub.add_parser("evaluate", help="how well the library's model classifies and retrieves its labelled "
                                         "sounds: zero-shot, prototypes and a linear model side by side")
    ev.add_argument("lib", metavar="LIB", help="a library built by `clap-ws library build`")
    ev.add_argument("--labels", default="folder", metavar="folder|REGEX",
                    help="each item's class: its folder's name (default), or a regular expression searched in its "
                         "path (named group 'label', else group 1, else the match)")
    ev.add_argument("--prompt", default="This is a sound of {label}.",
                    help="zero-shot prompt; {label} is the class with underscores as spaces (default: LAION's "
                         "ESC-50 protocol, %(default)r)")
    ev.add_argument("--captions", metavar="CSV", help="path,caption rows (several per file allowed): adds caption "
                                                      "<-> audio retrieval")
    ev.add_argument("--out", default="evaluation", metavar="DIR",
                    help="where evaluation.json, evaluation.md and the PNG figures go (default %(default)s)")
    ev.add_argument("--folds", type=int, default=5, help="cross-validation folds of the linear model (default 5)")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws per interval (default 1000)")
    ev.add_argument("--eval-seed", type=int, default=0,
                    help="seed of the folds, tie-breaking and bootstrap (default 0; --seed is the model's)")
    ev.add_argument("--server", metavar="URL", help="embed the prompts on a running clap-ws (ws://HOST:PORT) "
                                                    "instead of loading the model here")
    ev.add_argument("--token", default=os.environ.get("CLAP_WS_TOKEN"), help="--server's token (default "
                                                                              "$CLAP_WS_TOKEN)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(ev)
    return parser


def _projection(args: argparse.Namespace) -> int:
    import json

    from .projection.fit import FitOptions, fit
    from .projection.sources import read_source, read_triplets

    embeddings, ids, paths = read_source(args.source)
    human = read_triplets(args.triplets, ids, paths) if args.triplets else None
    options = FitOptions(dims=args.dims, method=args.method, hidden=tuple(args.hidden), epochs=args.epochs,
                         margin=args.margin, seed=args.fit_seed,
                         extra={"source": Path(args.source).name, "items": len(embeddings)})
    projection = fit(embeddings, options, human)
    projection.save(args.out)
    print(json.dumps({"out": args.out, **{k: projection.meta[k] for k in ("method", "dims", "items", "triplets",
                                                                          "figures", "fit_seconds")}}, indent=1))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"clap-ws evaluate needs {' and '.join(missing)}: pip install 'clap-ws[eval]'")
    from .evaluation import evaluate, write
    from .evaluation.remote import ServerTexts
    from .evaluation.run import check
    from .model.clap import model_identity
    from .search.library import Library

    library = Library.load(args.lib)
    check(library, args.labels, args.prompt, args.captions)  # before a model is loaded: fail in a second
    if args.server:
        embed_texts = ServerTexts(args.server, library.model, args.token)
    else:
        model = model_from_args(args)
        library.check_model(model_identity(model))
        embed_texts = model.embed_text
    result = evaluate(library, embed_texts, labels=args.labels, prompt=args.prompt, captions=args.captions,
                      folds=args.folds, draws=args.bootstrap, seed=args.eval_seed, progress=not args.no_progress)
    for path in write(result, args.out):
        print(path)
    if result["data"]["untrained"]:
        logging.getLogger("clap_ws").warning("the library's model is untrained (random weights): the figures are "
                                             "a random-encoder baseline, not CLAP's")
    return 0


def check_exposure(config, insecure: bool) -> None:
    """Refuse to listen beyond loopback without a token, unless told --insecure."""
    loopback = config.host in ("localhost", "::1") or config.host.startswith("127.")
    if not loopback and not config.token and not insecure:
        raise ModelError(
            f"--host {config.host} exposes the server beyond this machine: give --token (or CLAP_WS_TOKEN) "
            f"so clients must authenticate, or --insecure if the network is trusted"
        )
    if not loopback and insecure and not config.token:
        logging.getLogger("clap_ws").warning("listening on %s with no token (--insecure)", config.host)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        import time

        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        entry = {"time": stamp, "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


UNTRAINED_LIBRARY = ("built with the untrained model (random weights): its search results mean nothing; "
                     "for tests and latency work only")


def _library(args: argparse.Namespace) -> int:
    import json

    from .build import build
    from .cpu import instruction_set
    from .search.library import Library

    if args.library_command == "info":
        lib = Library.load(args.lib)
        lib.index.scan.pack()
        tags = sorted({t for item in lib.items for t in item.get("tags", [])})
        untrained = lib.model.get("name") == "untrained"
        print(json.dumps({"name": lib.name, "count": len(lib), "index": lib.index.kind, "model": lib.model,
                          "root": lib.root, "tags": tags, "prescan": lib.index.scan.prescan,
                          "cpu": instruction_set(),
                          **({"warning": UNTRAINED_LIBRARY} if untrained else {})}, indent=1))
        if untrained:
            logging.getLogger("clap_ws").warning("%s", UNTRAINED_LIBRARY)
        return 0
    embedder = None
    if args.ray is not None:
        from .ray_build import RayEmbedder

        embedder = RayEmbedder(model_options(args), args.max_seconds, workers=args.workers,
                               address=None if args.ray == "auto" else args.ray, gpus=args.ray_gpus,
                               send_bytes=args.ray_send_bytes)
    report = build(lambda: model_from_args(args), args.folder, args.out, batch=args.batch, index=args.index,
                   hnsw_threshold=args.hnsw_threshold, max_seconds=args.max_seconds, progress=not args.no_progress,
                   embedder=embedder)
    print(f"{args.out}: {report.total} items; embedded {report.embedded}, reused {report.reused} "
          f"({report.renamed} renamed or copied), resumed {report.resumed}, dropped {report.dropped}, "
          f"skipped {len(report.skipped)}")
    for path, reason in report.skipped:
        print(f"  skipped {path}: {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler], force=True)
    if args.log_level != "DEBUG":  # websockets logs two lines per connection: noise for an operator
        logging.getLogger("clap_ws.connections").setLevel(logging.WARNING)
    log = logging.getLogger("clap_ws")
    try:
        if args.command == "download":
            path = download(args.name, cache_dir(args.cache_dir), timeout=args.timeout)
            print(path)
            return 0
        if args.command == "library":
            return _library(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "projection":
            return _projection(args)
        from .projection import Projection
        from .search.archive import Archives
        from .search.library import Library
        from .server import ServerConfig, run

        config = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
        config = replace(config, allowed_origins=tuple(config.allowed_origins))
        check_exposure(config, args.insecure)
        libraries = [Library.load(path) for path in args.library]
        projection = Projection.load(args.projection) if args.projection else None
        model = model_from_args(args, download_missing=args.download)
        run(model, config, libraries=libraries, archives=Archives(args.archive_dir), projection=projection)
        return 0
    except ClapError as exc:  # ModelError, and bad labels, captions or options
        log.error("%s", exc)
        return 2
    except OSError as exc:  # e.g. the port is taken
        log.error("cannot start: %s", exc)
        return 1
