"""Command line shared by the peer servers."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def parse(description: str, argv: Sequence[str] | None = None,
          url: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--channel", default="bench", help="broker channel name")
    if url is not None:
        parser.add_argument("--url", default=url, help="broker URL (default %(default)s)")
    return parser.parse_args(argv)


def run_uvicorn(app: object, args: argparse.Namespace) -> None:
    """uvicorn with its defaults (websockets-sansio protocol, h11, asyncio loop)."""
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")  # type: ignore[arg-type]
