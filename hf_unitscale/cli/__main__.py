"""`python -m hf_unitscale.cli`: the `hf-unitscale` command (as `python -m hf_unitscale`)."""

import sys

from . import main

if __name__ == "__main__":  # not when a documentation tool or `pkgutil.walk_packages` imports it
    sys.exit(main())
