"""Every error the orchestrator raises on purpose.

Families by audience, each with the process exit code the CLI uses for it:

* ``DefinitionError`` (exit 2) — the user's configuration or calculations are wrong: unknown
  dependency, duplicate name, cycle, bad config file. Printed as one line, no traceback.
* ``StorageError`` (exit 2) — the database is unreachable, locked, too new or too old.
* ``RootDataError`` (exit 2) — a root data source cannot be read at all.
* ``CalculationFailed`` — user code raised while computing a cell; wraps the cause.

Messages say what failed, where, expected versus found, and the next command to run.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Root of all deliberate orchestrator errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class DefinitionError(OrchestratorError):
    """A calculation, the manifest or the configuration is invalid (exit code 2)."""


class ConfigError(DefinitionError):
    """The configuration file or an option is missing or malformed (exit code 2)."""


class ManifestError(DefinitionError):
    """Auto-discovery found an invalid graph: unknown dependency, duplicate name, cycle."""


class CycleError(ManifestError):
    """The dependency graph has a cycle; ``chain`` is the cycle, first name repeated at the end."""

    def __init__(self, chain: list[str]):
        self.chain = chain
        super().__init__(
            "dependency cycle: " + " -> ".join(chain) + "; remove one of these dependencies"
        )


class StorageError(OrchestratorError):
    """The ledger database cannot be used (unreachable, locked, wrong schema version)."""


class RunLockedError(StorageError):
    """Another run holds the run lock."""


class RootDataError(OrchestratorError):
    """A root data source cannot be read at all (missing file, unknown format, bad columns)."""


class CalculationFailed(OrchestratorError):
    """User code failed while computing a cell. ``cell`` is ``(calculation, date)``."""

    exit_code = 1

    def __init__(self, calculation: str, date: object, message: str):
        self.calculation = calculation
        self.date = date
        super().__init__(f"{calculation} on {date}: {message}")
