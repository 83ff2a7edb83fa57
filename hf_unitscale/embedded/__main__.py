"""``python -m hf_unitscale.embedded [names] [--force] [-q]``: fetch the assets into the cache."""

from __future__ import annotations

import sys

from .fetching import ASSET_NAMES, FetchError, cache_dir, fetch, stderr_handler


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import logging as std_logging

    parser = argparse.ArgumentParser(
        prog="python -m hf_unitscale.embedded",
        description="Fetch the embedded real models and data sets into the hf_unitscale cache.",
    )
    parser.add_argument("names", nargs="*", help=f"assets to fetch (default: {', '.join(ASSET_NAMES)})")
    parser.add_argument("--force", action="store_true", help="download and rebuild even if cached")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)

    package_logger = std_logging.getLogger("hf_unitscale")
    package_logger.addHandler(stderr_handler())
    package_logger.setLevel(std_logging.WARNING if args.quiet else std_logging.INFO)
    package_logger.propagate = False

    try:
        paths = fetch(args.names or None, force=args.force)
    except (FetchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cache: {cache_dir()}")
    for name, path in paths.items():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        print(f"{name:<10} {path}  ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
