"""The example calculations shipped with orchestrator, auto-discovered from this package.

``prices`` holds per-instrument indicators and market-wide summaries over daily OHLCV bars
(the S&P 500 file and the bundled ``examples/data/prices.csv.gz``); ``berka`` holds per-account
balances and flows over the Berka bank transactions. Each sub-package is pointed at by its own
config file (``orchestrator.toml``, ``examples/sp500.toml``, ``examples/berka.toml``).
"""
