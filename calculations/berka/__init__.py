"""Per-account balances and flows over the Berka (PKDD'99) bank transactions.

Root dataset ``transactions`` (``berka/trans_1993-01-01_1994-03-30.csv.gz``, see
``/work/shared/data/README.md`` §2.1), user column ``account_id``. Amounts are CZK with two
decimals, always positive; the sign comes from ``type``: ``PRIJEM`` credit, ``VYDAJ`` debit,
``VYBER`` (undocumented, cash withdrawal) debit. An unknown type fails the account's
calculation with a message rather than being guessed. Money is summed in integer hundredths
(haléře) so totals are exact, and reported in CZK.

Transactions happen on every calendar day, so every date of the slice is an available date; an
account gets a result only on the dates it has transactions.
"""
