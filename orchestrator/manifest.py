"""The manifest: auto-discovered calculations, validated and sorted into passes.

Discovery imports every module under the configured package (or folder) and collects each
subclass of ``StandardCalculation`` / ``MetaCalculation`` defined there. Validation rejects
duplicate names and unknown dependencies with messages naming both sides. Kahn's algorithm
(Kahn 1962, "Topological sorting of large networks") assigns each calculation to a *pass*: the
length of the longest dependency chain below it, so members of one pass are independent and
every dependency sits in an earlier pass. When Kahn cannot place every node the graph has a
cycle; Tarjan's strongly connected components (Tarjan 1972, "Depth-first search and linear
graph algorithms") find it and the error names the exact chain, ``a -> b -> c -> a``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import pkgutil
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from orchestrator.calculation import Calculation, MetaCalculation, StandardCalculation
from orchestrator.errors import CycleError, ManifestError
from orchestrator.fingerprint import digest, infra_hash
from orchestrator.lineage import Lineage, trace
from orchestrator.lineage_cache import LineageCache
from orchestrator.validation import Rules

EMPTY_LAYER = digest("layer", {})


@dataclass(frozen=True, slots=True)
class CalcSpec:
    """A discovered calculation: its metadata, normalised, plus its code, layer and
    infrastructure hashes and the lineage they come from.

    ``lookback`` is a number of available dates of the root datasets (>= 1, today included).
    """

    name: str
    kind: str  # "standard" | "meta"
    category: str
    dependencies: tuple[str, ...]
    root_data: tuple[str, ...]
    historical: bool
    lookback: int
    earliest_date: dt.date | None
    product_lines: tuple[str, ...]
    max_failure_rate: float
    code_hash: str
    cls: type[Calculation] = field(compare=False, repr=False)
    layer_hash: str = EMPTY_LAYER
    cosmetic_verdict: str | None = None  # "proof" | "simulation"; None: the config's
    rules: Rules = field(default_factory=Rules)
    breaker_min_users: int = 100
    infra_hash: str = field(default_factory=infra_hash)
    lineage: Lineage | None = field(default=None, compare=False, repr=False)
    columnar: bool = False  # it has a columnar form, ``compute(frame)``
    # Dependency -> window: how many of the dependency's dates (up to and including the
    # cell's) the cell reads; only dependencies with a window > 1 are listed.
    windows: tuple[tuple[str, int], ...] = ()

    def window(self, dep: str) -> int:
        """How many dates of dependency ``dep`` a cell reads (1: its own date only)."""
        for name, width in self.windows:
            if name == dep:
                return width
        return 1

    @property
    def is_standard(self) -> bool:
        return self.kind == "standard"

    @classmethod
    def from_class(
        cls,
        calc: type[Calculation],
        local_prefix: str | None = None,
        tracer: Callable[[type, str | None], Lineage] = trace,
    ) -> CalcSpec:
        """Read and check the class attributes of ``calc`` and trace its lineage (code,
        layers under ``local_prefix``, packages) with ``tracer`` (``lineage.trace``, or
        ``LineageCache.trace``: the same lineage).

        Raises:
            ManifestError: a metadata attribute has the wrong type or value.
        """
        where = f"{calc.__module__}.{calc.__qualname__}"
        name = calc.__dict__.get("name") or calc.__name__

        def names(attr: str) -> tuple[str, ...]:
            value = getattr(calc, attr)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ManifestError(f"{where}: '{attr}' must be a list of names, found {value!r}")
            return tuple(value)

        deps = calc.dependencies
        windows: dict[str, int] = {}
        if isinstance(deps, Mapping):
            for dep, width in deps.items():
                if not (
                    isinstance(dep, str)
                    and isinstance(width, int)
                    and not isinstance(width, bool)
                    and width >= 1
                ):
                    raise ManifestError(
                        f"{where}: 'dependencies' maps names to windows (ints >= 1, the "
                        f"number of the dependency's dates read), found {dep!r}: {width!r}"
                    )
                if width > 1:
                    windows[dep] = width
            dependencies = tuple(deps)
        else:
            dependencies = names("dependencies")
        lookback = calc.lookback
        if not isinstance(lookback, int) or lookback < 1:
            raise ManifestError(f"{where}: 'lookback' must be an int >= 1, found {lookback!r}")
        earliest = calc.earliest_date
        try:
            earliest_date = dt.date.fromisoformat(earliest) if earliest else None
        except (TypeError, ValueError) as e:
            raise ManifestError(
                f"{where}: 'earliest_date' must be 'YYYY-MM-DD', found {earliest!r}"
            ) from e
        if hasattr(calc, "simulate"):
            raise ManifestError(
                f"{where}: 'simulate' is no longer an attribute; a code change is cosmetic only "
                "when proven (cosmetic_verdict = 'proof', the default), or opt in to the "
                "simulation heuristic with cosmetic_verdict = 'simulation'"
            )
        verdict = calc.cosmetic_verdict
        if verdict not in (None, "proof", "simulation"):
            raise ManifestError(
                f"{where}: 'cosmetic_verdict' must be 'proof' or 'simulation', found {verdict!r}"
            )
        try:
            lineage = tracer(calc, local_prefix)
        except (OSError, TypeError, SyntaxError) as e:
            raise ManifestError(f"{where}: cannot read its source to hash it: {e}") from e
        return cls(
            name=name,
            kind=calc.kind,
            category=str(calc.category),
            dependencies=dependencies,
            root_data=names("root_data"),
            historical=bool(calc.historical),
            lookback=lookback,
            earliest_date=earliest_date,
            product_lines=names("product_lines"),
            max_failure_rate=float(calc.max_failure_rate),
            code_hash=lineage.code_hash,
            cls=calc,
            layer_hash=lineage.layer_hash,
            cosmetic_verdict=verdict,
            breaker_min_users=int(calc.breaker_min_users),
            rules=Rules(
                allow_nan=bool(calc.allow_nan),
                max_null_fraction=calc.max_null_fraction,
                nullable=frozenset(names("nullable")),
                flatline_min_users=calc.flatline_min_users,
                flatline_ok=frozenset(names("flatline_ok")),
            ),
            infra_hash=lineage.infra_hash,
            lineage=lineage,
            columnar=callable(getattr(calc, "compute", None)),
            windows=tuple(windows.items()),
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    """Validated calculations in dependency order.

    Attributes:
        calcs: name -> spec.
        passes: tuples of names; every dependency of a member lies in an earlier pass.
        order: all names, pass by pass, sorted by name inside a pass (deterministic).
    """

    calcs: Mapping[str, CalcSpec]
    passes: tuple[tuple[str, ...], ...]
    order: tuple[str, ...]

    @classmethod
    def build(cls, specs: Iterable[CalcSpec]) -> Manifest:
        """Validate ``specs`` and sort them into passes.

        Raises:
            ManifestError: duplicate name or unknown dependency.
            CycleError: the dependencies form a cycle (its chain is in the message).
        """
        calcs: dict[str, CalcSpec] = {}
        for spec in specs:
            if spec.name in calcs:
                other = calcs[spec.name].cls
                raise ManifestError(
                    f"duplicate calculation name '{spec.name}': "
                    f"{other.__module__}.{other.__qualname__} and "
                    f"{spec.cls.__module__}.{spec.cls.__qualname__}; rename one of them"
                )
            calcs[spec.name] = spec
        for spec in calcs.values():
            for dep in spec.dependencies:
                if dep not in calcs:
                    raise ManifestError(
                        f"calculation '{spec.name}' depends on '{dep}', which does not exist; "
                        f"known calculations: {', '.join(sorted(calcs)) or '(none)'}"
                    )
        passes = kahn_passes({n: s.dependencies for n, s in calcs.items()})
        return cls(
            calcs=calcs,
            passes=passes,
            order=tuple(n for p in passes for n in p),
        )

    def pass_of(self, name: str) -> int:
        for index, members in enumerate(self.passes):
            if name in members:
                return index
        raise KeyError(name)

    def dependents(self) -> dict[str, tuple[str, ...]]:
        """name -> names of the calculations that depend on it directly."""
        out: dict[str, list[str]] = {n: [] for n in self.calcs}
        for spec in self.calcs.values():
            for dep in spec.dependencies:
                out[dep].append(spec.name)
        return {n: tuple(sorted(v)) for n, v in out.items()}

    def downstream(self, names: Iterable[str]) -> set[str]:
        """``names`` plus every calculation that depends on one of them, transitively."""
        users = self.dependents()
        return _closure(names, lambda name: users[name])

    def upstream(self, names: Iterable[str]) -> set[str]:
        """``names`` plus every calculation one of them depends on, transitively."""
        return _closure(names, lambda name: self.calcs[name].dependencies)

    def slice(
        self, names: Iterable[str] | None = None, product_line: str | None = None
    ) -> Manifest:
        """The sub-manifest of ``names`` (and/or a product line) plus their upstream closure.

        Raises:
            ManifestError: an unknown calculation name.
        """
        wanted = set(names or ())
        unknown = wanted - set(self.calcs)
        if unknown:
            raise ManifestError(
                f"unknown calculation(s): {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(self.calcs))}"
            )
        if product_line:
            wanted |= {n for n, s in self.calcs.items() if product_line in s.product_lines}
        if not names and not product_line:
            return self
        closure = self.upstream(wanted)
        return Manifest.build(s for n, s in self.calcs.items() if n in closure)


def _closure(start: Iterable[str], edges: Callable[[str], Iterable[str]]) -> set[str]:
    """``start`` plus everything reachable from it along ``edges``."""
    closure: set[str] = set()
    stack = list(start)
    while stack:
        name = stack.pop()
        if name not in closure:
            closure.add(name)
            stack.extend(edges(name))
    return closure


def kahn_passes(graph: Mapping[str, Iterable[str]]) -> tuple[tuple[str, ...], ...]:
    """Kahn's topological sort, grouped in waves.

    Args:
        graph: node -> its dependencies (all of which are nodes).

    Returns:
        Passes (waves); pass k holds the nodes whose dependencies all lie in passes < k.

    Raises:
        CycleError: some nodes cannot be placed; the chain comes from ``find_cycle``.
    """
    deps = {n: set(d) for n, d in graph.items()}
    indegree = {n: len(d) for n, d in deps.items()}
    users: dict[str, list[str]] = {n: [] for n in deps}
    for node, node_deps in deps.items():
        for dep in node_deps:
            users[dep].append(node)
    wave = sorted(n for n, k in indegree.items() if k == 0)
    passes: list[tuple[str, ...]] = []
    placed = 0
    while wave:
        passes.append(tuple(wave))
        placed += len(wave)
        nxt = []
        for node in wave:
            for user in users[node]:
                indegree[user] -= 1
                if indegree[user] == 0:
                    nxt.append(user)
        wave = sorted(nxt)
    if placed != len(deps):
        raise CycleError(find_cycle(graph))
    return tuple(passes)


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """One dependency cycle of ``graph``, as a chain whose first name repeats at the end.

    Uses Tarjan's SCC algorithm (iterative, so deep graphs do not hit the recursion limit),
    then walks inside the first non-trivial component (smallest name first) back to its start.
    Returns ``[]`` when the graph is acyclic.
    """
    deps = {n: sorted(set(d)) for n, d in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(deps):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, child_i = work.pop()
            if child_i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            children = deps.get(node, [])
            if child_i < len(children):
                work.append((node, child_i + 1))
                child = children[child_i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    cyclic: list[list[str]] = [
        sorted(c) for c in components if len(c) > 1 or c[0] in deps.get(c[0], [])
    ]
    if not cyclic:
        return []
    members = set(min(cyclic))  # sorted, disjoint components: the smallest first name wins
    start = min(members)
    # The shortest chain inside the component from start back to itself (BFS).
    parents: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in deps[node]:
            if child == start:
                path: list[str] = [node]
                while (up := parents[path[-1]]) is not None:
                    path.append(up)
                return [*reversed(path), start]
            if child in members and child not in parents:
                parents[child] = node
                queue.append(child)
    raise AssertionError("a strongly connected component always closes a cycle")


def _import_all(package: ModuleType) -> list[ModuleType]:
    modules = [package]
    path = getattr(package, "__path__", None)
    if path is None:
        return modules
    for info in sorted(
        pkgutil.walk_packages(path, prefix=package.__name__ + "."), key=lambda i: i.name
    ):
        modules.append(_import(info.name))
    return modules


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ManifestError:
        raise
    except Exception as e:  # user code: any import-time error is a definition error
        raise ManifestError(
            f"cannot import calculation module '{name}': {type(e).__name__}: {e}"
        ) from e


def _package_for_folder(folder: Path) -> str:
    """Make ``folder`` importable and return its dotted package name.

    A folder inside a package tree (``__init__.py`` files) is imported under its full dotted
    name, so its modules can import sibling helpers; a plain folder becomes a top-level name.
    """
    if not folder.is_dir():
        raise ManifestError(f"calculations folder {folder} does not exist; fix 'calculations'")
    parts = [folder.name]
    root = folder
    while (root / "__init__.py").exists() and (root.parent / "__init__.py").exists():
        root = root.parent
        parts.insert(0, root.name)
    anchor = str(root.parent)
    if anchor not in sys.path:
        sys.path.insert(0, anchor)
    return ".".join(parts)


def discover(
    source: str, anchor: Path | None = None, cache: LineageCache | None = None
) -> list[CalcSpec]:
    """Import every module of ``source`` and return the calculation classes found.

    Args:
        source: a dotted package name, or an absolute folder path.
        anchor: a folder put on ``sys.path`` first, so a package next to the config imports.
        cache: lineages kept across processes (``lineage_cache``), saved after discovery;
            None: every lineage is traced.

    Raises:
        ManifestError: the package cannot be imported, or a class has invalid metadata.
    """
    if anchor is not None and str(anchor) not in sys.path:
        sys.path.insert(0, str(anchor))
    name = _package_for_folder(Path(source)) if Path(source).is_absolute() else source
    found: dict[type, CalcSpec] = {}
    for module in _import_all(_import(name)):
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, (StandardCalculation, MetaCalculation))
                and value not in (StandardCalculation, MetaCalculation)
                and value.__module__ == module.__name__
                and not value.__name__.startswith("_")
                and value not in found
            ):
                found[value] = CalcSpec.from_class(
                    value, name.split(".")[0], cache.trace if cache is not None else trace
                )
    if cache is not None:
        cache.save()
    return sorted(found.values(), key=lambda s: s.name)
