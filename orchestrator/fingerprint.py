"""All hashing of the audit chain: canonical encoding, code hash, result hash, fingerprints.

Design:

* ``encode(value)`` is the one canonical encoder for structured values: type-tagged and
  length-prefixed, mappings sorted by encoded key, floats by their IEEE-754 bits (``-0.0``
  folded into ``0.0``, every NaN into one NaN), unknown types rejected with ``TypeError``.
  ``digest(tag, value)`` hashes ``tag`` plus the encoding with xxh3-128, so two domains never
  collide by construction.
* Results are JSON by contract; they are stored and hashed as JSON lines in one canonical form
  (``result_line``: sorted keys, no whitespace, shortest round-trip floats). ``json`` escapes
  newlines, so a ``\\n`` terminator makes the concatenation unambiguous, and one C-speed
  serialisation serves storage and hashing alike (the shards hold the very bytes hashed).
* ``code_hash(cls)`` normalises the class source through the AST: comments, docstrings,
  formatting and line numbers do not count. Module-level functions, classes and constants the
  class references in its own module are followed transitively and included, so editing a
  helper defined next to the calculation changes its hash.

Changing any rule here changes stored fingerprints: bump ``HASH_FORMAT`` and say so in the
migration notes.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import json
import math
import struct
import sys
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any

import xxhash

HASH_FORMAT = 1
RESULT_FORMAT = 1
_NAN = struct.pack(">d", math.nan)


def encode(value: Any) -> bytes:
    """Canonical bytes of ``value`` (None, bool, int, float, str, bytes, list/tuple, dict, set).

    Raises:
        TypeError: for any other type (never silently ``str()`` it).
    """
    out = bytearray()
    _encode_into(value, out)
    return bytes(out)


def _encode_into(value: Any, out: bytearray) -> None:
    # bool before int: bool is an int subclass and True must not equal 1.
    if value is None:
        out += b"N"
    elif value is True:
        out += b"T"
    elif value is False:
        out += b"F"
    elif isinstance(value, int):
        raw = str(value).encode()
        out += b"i" + len(raw).to_bytes(4, "big") + raw
    elif isinstance(value, float):
        if math.isnan(value):
            out += b"f" + _NAN
        else:
            out += b"f" + struct.pack(">d", value + 0.0)
    elif isinstance(value, str):
        raw = value.encode()
        out += b"s" + len(raw).to_bytes(4, "big") + raw
    elif isinstance(value, bytes):
        out += b"b" + len(value).to_bytes(4, "big") + value
    elif isinstance(value, (list, tuple)):
        out += b"l" + len(value).to_bytes(4, "big")
        for item in value:
            _encode_into(item, out)
    elif isinstance(value, Mapping):
        items = sorted((encode(k), v) for k, v in value.items())
        out += b"d" + len(items).to_bytes(4, "big")
        for key, item in items:
            out += key
            _encode_into(item, out)
    elif isinstance(value, (set, frozenset)):
        members = sorted(encode(v) for v in value)
        out += b"S" + len(members).to_bytes(4, "big")
        for member in members:
            out += member
    else:
        raise TypeError(f"cannot canonically encode a value of type {type(value).__name__}")


def digest(tag: str, value: Any) -> str:
    """xxh3-128 hex digest (32 chars) of ``tag`` and the canonical encoding of ``value``."""
    return xxhash.xxh3_128_hexdigest(encode(tag) + encode(value))


# --- results ------------------------------------------------------------------------------


_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=True)
try:  # the C encoder called directly: half the cost of json.dumps per line, same output
    from json.encoder import c_make_encoder, encode_basestring_ascii

    _c_encode = c_make_encoder(
        None, _JSON.default, encode_basestring_ascii, None, ":", ",", True, False, True
    )

    def _canonical_json(value: Any) -> str:
        return "".join(_c_encode(value, 0))

except (ImportError, TypeError):  # pragma: no cover - interpreters without the C accelerator
    _canonical_json = _JSON.encode


def result_line(user: str | None, result: Any) -> bytes:
    """One canonical JSON line ``[user, result]\\n`` (``user`` None for a meta result).

    Canonical: keys sorted, no whitespace, ASCII-escaped strings, shortest round-trip floats.

    Raises:
        TypeError: the result holds a value JSON cannot represent (e.g. a numpy int64).
    """
    return (_canonical_json([user, result]) + "\n").encode()


class ResultHasher:
    """Incremental result hash over the canonical lines of a cell, fed in user order."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()
        self._h.update(encode("result") + encode(RESULT_FORMAT))

    def update(self, lines: bytes) -> None:
        self._h.update(lines)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def result_hash_of(lines: Iterable[bytes]) -> str:
    """Result hash of a whole cell given its canonical lines in user order."""
    hasher = ResultHasher()
    for line in lines:
        hasher.update(line)
    return hasher.hexdigest()


# --- code ---------------------------------------------------------------------------------


class _Normaliser(ast.NodeTransformer):
    """Drops docstrings; ``ast.dump`` without attributes already drops positions and comments."""

    def _strip_docstring(self, node: ast.AST) -> ast.AST:
        body = getattr(node, "body", None)
        if (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
        self.generic_visit(node)
        return node

    visit_FunctionDef = _strip_docstring
    visit_AsyncFunctionDef = _strip_docstring
    visit_ClassDef = _strip_docstring
    visit_Module = _strip_docstring


def normalised_source(source: str) -> str:
    """The canonical text of Python ``source``: its AST without docstrings and positions.

    Raises:
        SyntaxError: the source does not parse (never hashed as "unchanged").
    """
    tree = _Normaliser().visit(ast.parse(textwrap.dedent(source)))
    return ast.dump(tree, annotate_fields=True, include_attributes=False)


def _module_definitions(module_source: str) -> dict[str, ast.AST]:
    """Top-level name -> defining statement (function, class, assignment, import)."""
    defs: dict[str, ast.AST] = {}
    for stmt in ast.parse(module_source).body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[stmt.name] = stmt
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                for node in ast.walk(target):
                    if isinstance(node, ast.Name):
                        defs[node.id] = stmt
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                defs[(alias.asname or alias.name).split(".")[0]] = stmt
    return defs


def _referenced_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


# Class attributes that place or police results but never change them: a category change is a
# CATEGORY_MIGRATED move, not a code change.
PLACEMENT_ATTRIBUTES = frozenset({"category", "product_lines", "max_failure_rate"})


def _is_placement(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Assign):
        names = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
        return bool(names) and all(n in PLACEMENT_ATTRIBUTES for n in names)
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return stmt.target.id in PLACEMENT_ATTRIBUTES
    return False


def code_parts(cls: type) -> dict[str, str]:
    """Normalised definitions a calculation class is built from: its own class (without its
    placement attributes, ``PLACEMENT_ATTRIBUTES``) plus the module-level definitions of its
    module that it references, transitively.

    Returns:
        name -> normalised AST text; the class itself is under its own ``__qualname__``.

    Raises:
        OSError / TypeError: the source of ``cls`` cannot be found (e.g. defined in a REPL).
    """
    module = sys.modules[cls.__module__]
    class_source = textwrap.dedent(inspect.getsource(cls))
    tree = ast.parse(class_source)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            node.body = [s for s in node.body if not _is_placement(s)] or [ast.Pass()]
    parts = {cls.__qualname__: ast.dump(_Normaliser().visit(tree), include_attributes=False)}
    try:
        module_source = inspect.getsource(module)
    except (OSError, TypeError):
        return parts
    definitions = _module_definitions(module_source)
    pending = _referenced_names(ast.parse(class_source)) - set(dir(builtins))
    seen: set[str] = {cls.__name__}
    while pending:
        name = pending.pop()
        if name in seen or name not in definitions:
            continue
        seen.add(name)
        stmt = definitions[name]
        parts[name] = ast.dump(_Normaliser().visit(stmt), include_attributes=False)
        pending |= _referenced_names(stmt) - seen
    return parts


def code_hash(cls: type) -> str:
    """Code hash of a calculation class (see ``code_parts``); 32 hex chars."""
    return digest("code", code_parts(cls))


def infra_parts() -> dict[str, Any]:
    """What the infrastructure hash covers: Python version and our storage formats."""
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "result_format": RESULT_FORMAT,
        "hash_format": HASH_FORMAT,
    }


def infra_hash() -> str:
    return digest("infra", infra_parts())


ABSENT_HASH = "-" * 32  # stands for a missing hash in inputs_digest


def inputs_digest(shape: str, hashes: list[str | None]) -> str:
    """Digest of everything a cell consumed besides its own code.

    Args:
        shape: ``digest("shape", ...)`` of the calculation's input names (dependencies, root
            datasets, lookback, historical), so the fixed-width part below is unambiguous.
        hashes: 32-hex digests in the order the shape fixes (upstream result hashes, root
            window digests, own previous result hash), ``None`` where absent.

    Each item is exactly 32 bytes, so concatenation is a canonical encoding; this keeps the
    per-cell cost of planning at one short xxh3 call.
    """
    return xxhash.xxh3_128_hexdigest(
        (shape + "".join([ABSENT_HASH if h is None else h for h in hashes])).encode()
    )
