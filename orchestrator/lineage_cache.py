"""Lineages kept across processes, reused only when everything they were made from is unchanged.

Tracing a calculation's lineage (``lineage.trace``: parsing, normalising and proving every
definition it uses) costs more than the rest of a no-op run's own work. Its result is a
function of:

* the class's module and qualified name and the local prefix (the entry's key);
* the engine: this module, ``lineage``, ``equivalence`` and ``fingerprint`` (their source
  bytes) and the Python version (``ENGINE``, for the whole file);
* what the trace read, recorded by ``lineage.Reads``: the class's source text (through
  ``linecache``, as ``inspect.getsource`` reads it), the source text of every module it
  followed (file and text digest), whether each ``from pkg import x`` named a module, and the
  distribution and version of every package it imports.

An entry is reused only when each of those reads gives the same answer now: the texts are
read and hashed again (xxh3 of the bytes; a changed comment misses too), the module lookups
redone, and the distributions taken from a record valid only while the installed
distributions are the same (``site_key``: the ``.dist-info`` / ``.egg-info`` entries of every
``sys.path`` folder with the modification times of their metadata files). So a cached lineage
is the lineage a trace would compute now; a code edit can never go unnoticed.

Statement parts (normal form, proof form, statement digests) are memoised under the statement's
own source text (``Reads.parts``), so after an edit only the statements whose text changed are
normalised and proven again.

The cache is one JSON file (in the project's ``work_dir``), replaced atomically; a missing,
unreadable or foreign file is an empty cache, and a write that fails only loses the speed-up.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from orchestrator import equivalence, fingerprint, lineage
from orchestrator.equivalence import ProofForm
from orchestrator.fingerprint import digest
from orchestrator.lineage import Lineage, Reads, _distribution_of, _is_module

CACHE_FORMAT = 2
SITES = 4  # site keys kept, newest first
_METADATA_FILES = ("METADATA", "PKG-INFO", "RECORD", "top_level.txt", "SOURCES.txt")


def engine_key() -> str:
    """Digest of what turns reads into a lineage: the source bytes of the tracing modules,
    the Python version, the cache format."""
    sources = [
        Path(m.__file__).read_bytes()  # type: ignore[arg-type]
        for m in (lineage, equivalence, fingerprint, sys.modules[__name__])
    ]
    return digest("lineage-engine", [CACHE_FORMAT, sys.version, *sources])


def site_key() -> str:
    """Digest of the installed distributions as ``importlib.metadata`` finds them: for every
    ``sys.path`` entry, its distribution metadata folders (names carry the version) with the
    modification times of the folder and of its metadata files; for a file entry (a zip),
    its size and time; and the meta path finders. Installing, removing, upgrading or
    reinstalling a distribution changes it."""
    parts: list[Any] = [[f"{type(f).__module__}.{type(f).__qualname__}" for f in sys.meta_path]]
    for entry in sys.path:
        folder = entry or os.getcwd()
        try:
            info = os.stat(folder)
        except OSError:
            parts.append([entry, None])
            continue
        if not stat.S_ISDIR(info.st_mode):  # a zip archive
            parts.append([entry, info.st_size, info.st_mtime_ns])
            continue
        try:
            names = sorted(
                n for n in os.listdir(folder) if n.lower().endswith((".dist-info", ".egg-info"))
            )
        except OSError:
            parts.append([entry, "unlisted"])
            continue
        dists = []
        for name in names:
            path = os.path.join(folder, name)
            times: list[int | None] = []
            for file in ("", *_METADATA_FILES):
                try:
                    times.append(os.stat(os.path.join(path, file) if file else path).st_mtime_ns)
                except OSError:
                    times.append(None)
            dists.append([name, times])
        if dists:  # a folder without distributions adds none (the program's own folder)
            parts.append([entry, dists])
    return digest("lineage-site", parts)


def _pair(value: Any) -> tuple[str, str] | None:
    return None if value is None else (str(value[0]), str(value[1]))


class LineageCache:
    """Lineages of one project's calculations, kept in ``path`` across processes.

    Use: ``cache = LineageCache.load(path)``, ``cache.trace(cls, prefix)`` for each class (as
    ``lineage.trace``), then ``cache.save()``, which keeps only what this round used.
    """

    def __init__(self, path: Path | None, data: dict[str, Any] | None = None):
        self.path = path
        self.engine = engine_key()
        data = data if data is not None and data.get("engine") == self.engine else {}
        entries, memo, sites = data.get("entries"), data.get("memo"), data.get("sites")
        self._entries: dict[str, Any] = entries if isinstance(entries, dict) else {}
        self._memo: dict[str, Any] = memo if isinstance(memo, dict) else {}
        # site key -> top-level name -> distribution: a few, since one project is run from
        # interpreters whose sys.path differ (the console script, ``python -m``, tests)
        self._sites: dict[str, dict[str, Any]] = {
            k: v
            for k, v in (sites if isinstance(sites, dict) else {}).items()
            if isinstance(v, dict)
        }
        self._site_dists: dict[str, Any] = {}
        self._site_now: str | None = None
        self._used_entries: dict[str, Any] = {}
        self._used_memo: set[str] = set()
        self._changed = False
        self.hits = 0
        self.misses = 0

    @classmethod
    def load(cls, path: Path) -> LineageCache:
        """The cache kept in ``path`` (empty when the file is missing, unreadable, or written
        by another engine)."""
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            data = None
        return cls(path, data if isinstance(data, dict) else None)

    # --- distributions ------------------------------------------------------------------

    def _site(self) -> str:
        if self._site_now is None:
            self._site_now = site_key()
            if self._site_now not in self._sites:
                self._changed = True
            self._site_dists = self._sites.pop(self._site_now, {})
            self._sites = {self._site_now: self._site_dists, **self._sites}  # newest first
        return self._site_now

    def distribution(self, top: str) -> tuple[str, str] | None:
        """``lineage._distribution_of(top)``, remembered per ``site_key``."""
        self._site()
        if top in self._site_dists:
            try:
                return _pair(self._site_dists[top])
            except (TypeError, IndexError, KeyError):
                pass
        found = _distribution_of(top)
        self._site_dists[top] = None if found is None else list(found)
        self._changed = True
        return found

    # --- lineages -----------------------------------------------------------------------

    def trace(self, cls: type, local_prefix: str | None = None) -> Lineage:
        """``lineage.trace(cls, local_prefix)``, from the cache when every recorded read
        gives the same answer now.

        Raises:
            as ``lineage.trace``.
        """
        key = f"{cls.__module__}:{cls.__qualname__}:{local_prefix or ''}"
        entry = self._entries.get(key)
        if isinstance(entry, dict):
            try:
                found = self._reuse(cls, entry)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError):
                found = None  # a damaged entry: traced again
            if found is not None:
                self.hits += 1
                self._used_entries[key] = entry
                self._used_memo.update(entry.get("memo", ()))
                return found
        self.misses += 1
        reads = Reads(self._memo, self.distribution)
        traced = lineage.trace(cls, local_prefix, reads)
        self._used_entries[key] = {
            "source": list(reads.source) if reads.source else None,
            "texts": {m: (list(v) if v else None) for m, v in reads.texts.items()},
            "modules": reads.modules,
            "dists": {t: (list(v) if v else None) for t, v in reads.dists.items()},
            "memo": sorted(reads.used),
            "lineage": {
                "code": traced.code,
                "layers": traced.layers,
                "packages": traced.packages,
                "statements": traced.statements,
                "proof": {k: [v.text, list(v.tokens)] for k, v in traced.proof.items()},
            },
        }
        self._used_memo.update(reads.used)
        self._changed = True
        return traced

    def _reuse(self, cls: type, entry: dict[str, Any]) -> Lineage | None:
        """The entry's lineage if every read it records answers the same now, else None."""
        try:
            source = lineage.class_source_digest(cls)
        except (OSError, TypeError):
            return None  # the trace raises the error the caller must see
        if _pair(entry["source"]) != source:
            return None
        for module, recorded in entry["texts"].items():
            try:
                now = lineage.text_digest(module)
            except (ImportError, ValueError, OSError):
                return None
            if _pair(recorded) != now:
                return None
        for name, recorded in entry["modules"].items():
            if _is_module(name) != recorded:
                return None
        for top, recorded in entry["dists"].items():
            if self.distribution(top) != _pair(recorded):
                return None
        parts = entry["lineage"]
        return Lineage(
            code={str(k): str(v) for k, v in parts["code"].items()},
            layers={str(k): str(v) for k, v in parts["layers"].items()},
            packages={str(k): str(v) for k, v in parts["packages"].items()},
            statements={str(k): [str(d) for d in v] for k, v in parts["statements"].items()},
            proof={
                str(k): ProofForm(str(v[0]), tuple(str(t) for t in v[1]))
                for k, v in parts["proof"].items()
            },
        )

    def save(self) -> None:
        """Write what this round used (entries and statement memo) when anything changed;
        a failed write is ignored (the next process traces again)."""
        memo = {k: self._memo[k] for k in self._used_memo if k in self._memo}
        if not (
            self._changed
            or set(self._entries) != set(self._used_entries)
            or len(memo) != len(self._memo)
        ):
            return
        if self.path is None:
            return
        data = {
            "format": CACHE_FORMAT,
            "engine": self.engine,
            "sites": {k: self._sites[k] for k in [self._site(), *self._sites][:SITES]},
            "entries": self._used_entries,
            "memo": memo,
        }
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
