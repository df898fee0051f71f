#!/usr/bin/env python3
"""Write docs/configuration.md from clap-ws's own argument parser, so the options' page cannot drift.

    python scripts/configuration.py          # rewrite docs/configuration.md
    python scripts/configuration.py --check  # exit 1 if it is out of date (the tests run this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clap_ws.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "configuration.md"
HEADER = """# Configuration

Every option of every `clap-ws` subcommand, generated from the argument parser by
`python scripts/configuration.py` (a test checks that this page is current). `clap-ws COMMAND --help` prints
the same. `./start_clap_service.sh [options]` runs `clap-ws serve --host ${HOST:-127.0.0.1} --port
${PORT:-32051} [options]`.

Environment: `CLAP_CHECKPOINT_PATH` (checkpoint), `CLAP_MODEL` (`--model`), `CLAP_WS_ENGINE` (`--engine`),
`CLAP_WS_ENGINE_CACHE` (OpenVINO's export and compiled code), `CLAP_DEVICE`, `CLAP_TOKENIZER_DIR`,
`CLAP_WS_CACHE_DIR`, `CLAP_WS_TOKEN`, `CLAP_WS_CHECKPOINT_URL` and `CLAP_WS_TOKENIZER_URL` (download mirrors);
`ONEDNN_MAX_CPU_ISA` (e.g. `AVX2`) makes the process run as a CPU with that instruction set would;
`HF_HOME`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE` are huggingface_hub's own (where `--model` looks).

Two limits look alike and differ on purpose: `serve --max-seconds` (60) bounds what one client may send in one
clip, while `library build --max-seconds` (600) skips longer files in a folder you chose to embed.
"""


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _row(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.option_strings and action.nargs != 0 and action.metavar:
        names += f" `{action.metavar}`"
    help_text = (action.help or "") % {"default": action.default, "prog": parser.prog}
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        help_text += f" (one of: {', '.join(map(str, action.choices))})"
    if action.option_strings and action.nargs != 0 and action.default not in (None, [], argparse.SUPPRESS) \
            and "default" not in help_text:
        help_text += f" (default {action.default})"
    return f"| {names} | {help_text.replace('|', '/')} |"


def render() -> str:
    parser = build_parser()
    parts = [HEADER]
    commands = []
    for name, sub in _subparsers(parser):
        nested = list(_subparsers(sub))
        commands += [(f"{name} {n}", s) for n, s in nested] if nested else [(name, sub)]
    for title, sub in [("clap-ws (global)", parser)] + [(f"clap-ws {n}", s) for n, s in commands]:
        parts.append(f"## `{title}`\n")
        if sub.description:
            parts.append(sub.description + "\n")
        parts.append("| option | meaning |\n| --- | --- |")
        parts += [_row(a, sub) for a in sub._actions
                  if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        parts.append("")
    return "\n".join(parts)


def main(argv=None) -> int:
    args = argparse.ArgumentParser(description=__doc__).parse_known_args(argv)[1]
    text = render()
    if "--check" in args:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/configuration.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
