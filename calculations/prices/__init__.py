"""Indicators over daily OHLCV price bars, one user per instrument.

Root dataset ``prices``: columns ``date, open, high, low, close, volume, Name`` (the layout of
``/work/shared/data/sp500_daily_ohlcv_2013-02-08_2018-02-07.csv.gz``), user column ``Name``.
Prices are in the quote currency per share; returns and ratios are plain fractions
(0.01 = 1 %), never percent, except RSI which is on Wilder's 0..100 scale.

Conventions shared by every calculation here:

* A date is an *available* date of the dataset (a trading day with at least one row). An
  instrument without a row on a date gets no result that date (the engine does not call us).
* Historical state (``ctx.previous``) never crosses a gap: the engine gives ``None`` after a
  day without a row, and each calculation says how it re-seeds from ``ctx.history``.
* Closes that are null or not positive are treated as missing (no return can be formed).
  ``open`` is never used, so null or inconsistent opens do not matter.
* If a source ever repeats a (Name, date), the last row of that date wins.
* Results hold JSON values only: missing values are ``None``, never NaN or infinity.
"""
