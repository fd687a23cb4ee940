"""loratune's cache folder: converted models, tokenized data, measurements of this machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("LORATUNE_CACHE") or Path.home() / ".cache" / "loratune")
