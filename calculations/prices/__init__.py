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

Every calculation has both forms: ``process(ctx)`` per instrument (or per date, for the
market ones) and ``compute(frame)`` over a block of dates × instruments with NumPy (see
``orchestrator.calculation.Frame``); the engine runs ``compute`` unless the config says
``columnar = false``. Both publish the same results, bit for bit (tested in
``tests/test_columnar_forms.py``): the columnar form returns NaN for a missing float (the
float null, the same stored value as ``None``) and ``None`` for a missing text, reads the
same dates (``frame.root_present`` for "has a row"), carries state only from a result of the
date before (``frame.previous_present``, then ``frame.present`` inside the block), and does
the same float operations in the same order (sums accumulate ``s = s + x`` oldest first in
both forms, never ``math.fsum`` or NumPy's pairwise sums).
"""
