"""orchestrator — a build-system style, incremental orchestrator for nightly calculations.

Users write calculations as small classes::

    from orchestrator import StandardCalculation

    class DailyReturn(StandardCalculation):
        name = "daily_return"
        root_data = ["prices"]
        def process(self, ctx):
            ...

and run ``orchestrator run``. See README.md and SPEC.md.
"""

from orchestrator.calculation import (
    MetaCalculation,
    MetaContext,
    StandardCalculation,
    StandardContext,
)

__all__ = ["MetaCalculation", "MetaContext", "StandardCalculation", "StandardContext"]
__version__ = "0.1.0"
