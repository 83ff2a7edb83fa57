"""`python -m hf_unitscale`: the `hf-unitscale` command, for environments whose scripts folder is not on PATH."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a documentation tool or `pkgutil.walk_packages` imports it
    sys.exit(main())
