#!/usr/bin/env python3
"""Build or update a sound library: a thin wrapper of `clap-ws library build`.

    scripts/build_library.py ~/sounds --out sounds.npz --checkpoint 630k-audioset-best.pt
"""
import sys

from clap_ws.cli import main

if __name__ == "__main__":
    sys.exit(main(["library", "build", *sys.argv[1:]]))
