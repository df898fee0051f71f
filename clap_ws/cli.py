"""``clap-ws`` (also ``python -m clap_ws``): one command, several subcommands.

* ``serve``    - load the model and serve WebSocket clients until SIGINT/SIGTERM;
* ``download`` - fetch a published checkpoint and the tokenizer files (the
  only subcommand that touches the network).

Every subcommand that loads a model takes the same model options
(:func:`add_model_options`), and server defaults come from
:class:`~clap_ws.server.ServerConfig`, so they are written down once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from . import __version__
from .errors import ModelError
from .weights import DEFAULT_CHECKPOINT, KNOWN_CHECKPOINTS, cache_dir, download, load_model

_SERVER_HELP = {
    "host": "address to bind (default %(default)s; loopback only)",
    "port": "TCP port (default %(default)s; 0 picks a free one)",
    "sample_rate": "sample rate of binary frames without ?sample_rate= (default %(default)s)",
    "max_seconds": "longest clip accepted, in seconds (default %(default)s)",
    "max_batch": "most windows per model call (default %(default)s)",
    "max_wait_ms": "how long a batch waits for more requests (default %(default)s ms)",
    "max_queue": "requests waiting for the model before replies are `busy` (default %(default)s)",
    "max_items": "most buffers in one embed_batch request (default %(default)s)",
    "max_frame_mb": "largest WebSocket frame in MiB; larger closes with 1009 (default %(default)s)",
    "max_pipeline": "unanswered requests per connection before it stops being read (default %(default)s)",
    "max_connections": "open connections before new ones close with 1013 (default %(default)s)",
    "ping_interval": "seconds between keepalive pings (default %(default)s)",
    "ping_timeout": "seconds to wait for a pong before dropping a client (default %(default)s)",
    "shutdown_timeout": "seconds in-flight requests get to finish on SIGTERM (default %(default)s)",
}
_SERVER_FLAGS = {"warm_up": "--no-warm-up"}  # booleans that default to True


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", metavar="PATH",
                       help=f"LAION-CLAP checkpoint (.pt); default $CLAP_CHECKPOINT_PATH, else "
                            f"<cache>/{DEFAULT_CHECKPOINT}")
    group.add_argument("--untrained", action="store_true",
                       help="random weights, same architecture: for tests and latency work only")
    group.add_argument("--seed", type=int, default=0, help="seed of --untrained weights (default 0)")
    group.add_argument("--audio-model", default="HTSAT-tiny", choices=["HTSAT-tiny", "HTSAT-base", "HTSAT-large"],
                       help="architecture of --untrained (checkpoints are detected)")
    group.add_argument("--device", help="cuda, cuda:1, mps or cpu (default $CLAP_DEVICE, else auto)")
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="auto: bf16 on CUDA and on CPUs with native bf16, else fp32")
    group.add_argument("--cache-dir", help="where checkpoints live (default $CLAP_WS_CACHE_DIR or ~/.cache/clap-ws)")
    group.add_argument("--tokenizer", metavar="DIR",
                       help="roberta-base tokenizer folder (default $CLAP_TOKENIZER_DIR, the cache, the HF cache)")
    group.add_argument("--allow-pickle", action="store_true",
                       help="load checkpoints holding non-tensor objects (runs pickle code: trusted files only)")


def model_from_args(args: argparse.Namespace, download_missing: bool = False):
    return load_model(args.checkpoint, untrained=args.untrained, seed=args.seed, audio_model=args.audio_model,
                      device=args.device, precision=args.precision, cache=args.cache_dir,
                      tokenizer_dir=args.tokenizer, allow_pickle=args.allow_pickle,
                      download_missing=download_missing)


def build_parser() -> argparse.ArgumentParser:
    from .server import ServerConfig

    parser = argparse.ArgumentParser(prog="clap-ws", description="LAION-CLAP embeddings over WebSocket")
    parser.add_argument("--version", action="version", version=f"clap-ws {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve embeddings over WebSocket")
    add_model_options(serve)
    group = serve.add_argument_group("server")
    for f in fields(ServerConfig):
        if f.name in _SERVER_FLAGS:
            group.add_argument(_SERVER_FLAGS[f.name], dest=f.name, action="store_false",
                               help="skip the warm-up model call before listening")
        else:
            group.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                               help=_SERVER_HELP[f.name])
    group.add_argument("--download", action="store_true",
                       help="fetch the default checkpoint and tokenizer first if missing (network)")

    fetch = sub.add_parser("download", help="fetch a published checkpoint and the roberta-base tokenizer")
    fetch.add_argument("name", nargs="?", default=DEFAULT_CHECKPOINT,
                       help="one of: " + ", ".join(KNOWN_CHECKPOINTS) + " (default %(default)s)")
    fetch.add_argument("--cache-dir", help="destination (default $CLAP_WS_CACHE_DIR or ~/.cache/clap-ws)")
    fetch.add_argument("--timeout", type=float, default=15.0, help="seconds per network wait (default 15)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    log = logging.getLogger("clap_ws")
    try:
        if args.command == "download":
            path = download(args.name, cache_dir(args.cache_dir), timeout=args.timeout)
            print(path)
            return 0
        from .server import ServerConfig, run

        config = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
        model = model_from_args(args, download_missing=args.download)
        run(model, config)
        return 0
    except ModelError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # e.g. the port is taken
        log.error("cannot start: %s", exc)
        return 1
