"""Load generator (open-loop Poisson and closed-loop, HTTP and WebSocket)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``infercache bench`` flags to ``parser``."""
    parser.add_argument("--url", default="http://127.0.0.1:8000")


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``infercache bench``."""
    raise SystemExit("infercache bench: not implemented yet")
