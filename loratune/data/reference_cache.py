"""Reference log-probabilities on disk, in the loratune cache beside the tokens: a sequence's log-probability under
the reference (the frozen base, with the `reference` run's adapter merged in if any) does not change between
epochs, runs or a run and its resumption, so it is computed once.

An entry is keyed by the sequence's tokens and targets, in a folder keyed by what else decides the value (the
model's weights, the reference run's adapter, the base's number format, the device type). Each save writes the
entries that are new since the last one to a file of its own, named by its content: several processes, or runs at
once, never write the same file, and reading takes the union of the folder's files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..core.cache import cache_dir

VERSION = 1  # bump when the entries or their layout change


def sequence_key(ids: np.ndarray, labels: np.ndarray) -> bytes:
    """A sequence's identity: its token ids and which of them are targets."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    h.update(np.packbits(labels >= 0).tobytes())
    return h.digest()


class ReferenceCache:
    def __init__(self, folder: Path):
        self.folder = folder
        self.known: dict[bytes, float] = {}
        for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
            try:
                with np.load(path) as f:
                    self.known.update(zip(map(bytes, f["keys"]), f["values"].tolist()))
            except (OSError, ValueError, KeyError):  # a damaged file is ignored: its entries are computed again
                continue
        self.saved = set(self.known)

    @classmethod
    def of(cls, *identity) -> ReferenceCache:
        """The cache of the reference that `identity` (JSON-serialisable parts) names."""
        key = hashlib.sha256(json.dumps([VERSION, *identity]).encode()).hexdigest()[:32]
        return cls(cache_dir() / "reference" / key)

    def fill(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Set the unknown (NaN) `values` whose `keys` (bytes, same shape) are cached."""
        for index in zip(*np.nonzero(np.isnan(values))):
            if keys[index] in self.known:
                values[index] = self.known[keys[index]]

    def save(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Write the computed `values` not written before; an error costs only a later run's recomputation."""
        new = {k: v for k, v in zip(keys.ravel(), values.ravel().tolist()) if v == v and k not in self.saved}
        if not new:
            return
        arrays = dict(keys=np.array([np.frombuffer(k, np.uint8) for k in new]), values=np.array(list(new.values())))
        name = hashlib.sha256(arrays["keys"].tobytes()).hexdigest()[:24]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{name}.{os.getpid()}.tmp.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, self.folder / f"{name}.npz")
        except OSError:
            return
        self.known.update(new)
        self.saved.update(new)
