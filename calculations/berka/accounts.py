"""Per-account calculations: end-of-day balance, the day's net flow, 30-day flows, overdraft.

Money helpers work in integer hundredths of a CZK ("cents"): ``amount`` and ``balance`` have
two decimals, so ``round(x * 100)`` is exact and sums cannot drift.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from orchestrator.calculation import StandardCalculation, StandardContext

# The sign of a transaction's amount, by its ``type`` (data README §2.1 and §2.3).
SIGNS = {"PRIJEM": 1, "VYDAJ": -1, "VYBER": -1}


def _cents(value: Any) -> int:
    return round(float(value) * 100)


def _signed_cents(row: dict[str, Any]) -> int:
    """The row's amount in cents, positive for a credit and negative for a debit.

    Raises:
        ValueError: unknown ``type`` or missing ``amount`` (never guessed: a wrong sign would
            corrupt every later balance).
    """
    sign = SIGNS.get(row.get("type"))  # type: ignore[arg-type]
    if sign is None or row.get("amount") is None:
        raise ValueError(
            f"transaction {row.get('trans_id')} of account {row.get('account_id')}: "
            f"type {row.get('type')!r} amount {row.get('amount')!r}; expected a type in "
            f"{sorted(SIGNS)} and an amount"
        )
    return sign * _cents(row["amount"])


def _snap(expected: int, posts: list[int], tolerance: int) -> int | None:
    """The recorded balance nearest to ``expected`` (the smaller on a tie), if within
    ``tolerance`` cents; else None."""
    if not posts:
        return None
    nearest = min(posts, key=lambda b: (abs(b - expected), b))
    return nearest if abs(nearest - expected) <= tolerance else None


def _chain_end(rows: list[dict[str, Any]], tolerance: int) -> int | None:
    """The day's end balance read from the balance chain of its rows, whatever their order.

    Each row moves the balance from ``pre = balance - signed amount`` to ``post = balance``;
    in the day's (unknown) order, every post-balance but the last is the pre-balance of the
    next row. So the end balance is the post-balance that is no other row's pre-balance
    (within ``tolerance``, for the source's rounding of interest and fee postings). Returns
    None when that is not a single value: a day whose chain closes on itself (e.g. a credit
    and a debit of equal amounts) cannot be ordered from its rows alone.
    """
    posts = [_cents(r["balance"]) for r in rows]
    pres = [post - _signed_cents(r) for post, r in zip(posts, rows)]
    ends = {
        post
        for i, post in enumerate(posts)
        if not any(abs(pre - post) <= tolerance for j, pre in enumerate(pres) if j != i)
    }
    return ends.pop() if len(ends) == 1 else None


def _end_balance(
    rows: list[dict[str, Any]], opening: int | None, tolerance: int
) -> tuple[int | None, str]:
    """(end-of-day balance in cents, method) for one account-day; see ``Balance``."""
    chain = _chain_end(rows, tolerance)
    if opening is not None:
        expected = opening + sum(_signed_cents(r) for r in rows)
        # Among the recorded balances near the expected one, the chain's end is the right
        # one: a 0.10 CZK rounding quirk can put another row's balance just as near.
        if chain is not None and abs(chain - expected) <= tolerance:
            return chain, "previous"
        snapped = _snap(expected, [_cents(r["balance"]) for r in rows], tolerance)
        if snapped is not None:
            return snapped, "previous"
    return (chain, "chain") if chain is not None else (None, "ambiguous")


class Balance(StandardCalculation):
    """End-of-day balance of an account, in CZK (can be negative).

    The order of an account's transactions within a day is unknown (data README §2.1), so the
    end-of-day balance is found in one of three ways, in this order (``method``):

    1. ``"previous"``: previous end-of-day balance (``ctx.previous``, i.e. the account also
       had transactions on the previous date) plus the day's signed net, then snapped to a
       ``balance`` recorded that day within ``tolerance_cents``: the end of the day's chain
       (rule 2) if it is that near, else the nearest one. Snapping keeps the bank's own
       figure: interest and fee postings are rounded in the source, so a pure sum drifts by
       0.10 CZK per quirk (the README found every account-day within 0.20 CZK). Preferring
       the chain's end matters when a 0.10 CZK fee follows such a quirk (account 9041 on
       1994-02-28: the sum lands on 298.9, the balance before the last fee; the day ends at
       298.8).
    2. ``"chain"``: reconstruct from the day's rows alone: the recorded post-balance that no
       other row starts from (see ``_chain_end``).
    3. ``"history"``: if the day's chain is ambiguous, replay the account's earlier days in
       ``ctx.history`` (the last ``lookback`` dates) with rules 1-2 to get the opening balance,
       then apply rule 1.

    If all fail, ``balance`` is ``None`` with ``method = "ambiguous"`` rather than a guess.
    ``opening = balance - net``. Accounts are not called on dates without transactions; their
    balance is unchanged then (see ``bank_summary`` for the bank-wide last known balances).

    Result: ``{"balance": float | None, "opening": float | None, "net": float,
    "n_transactions": int, "method": str}``.
    """

    name = "balance"
    category = "balances"
    root_data = ("transactions",)
    historical = True
    # Today plus 30 days: how far back an ambiguous day looks for the account's last balance.
    lookback = 31
    tolerance_cents = 20

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        rows = ctx.root["transactions"]
        tol = self.tolerance_cents
        net = sum(_signed_cents(r) for r in rows)
        prev = ctx.previous
        opening = _cents(prev["balance"]) if prev and prev.get("balance") is not None else None
        end, method = _end_balance(rows, opening, tol)
        if end is None:
            end = self._from_history(ctx)
            method = "history" if end is not None else "ambiguous"
        return {
            "balance": None if end is None else end / 100,
            "opening": None if end is None else (end - net) / 100,
            "net": net / 100,
            "n_transactions": len(rows),
            "method": method,
        }

    def _from_history(self, ctx: StandardContext) -> int | None:
        """Today's end balance from the account's earlier days in the window, or None."""
        today = ctx.date.isoformat()
        days: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in ctx.history["transactions"]:
            if row["date"] < today:
                days[row["date"]].append(row)
        if not days:
            return None
        balance: int | None = None
        for day in sorted(days):
            balance, _ = _end_balance(days[day], balance, self.tolerance_cents)
        if balance is None:
            return None
        posts = [_cents(r["balance"]) for r in ctx.root["transactions"]]
        net = sum(_signed_cents(r) for r in ctx.root["transactions"])
        return _snap(balance + net, posts, self.tolerance_cents)


class NetFlow(StandardCalculation):
    """The account's money moved on the day, in CZK.

    ``inflow`` is the sum of credits, ``outflow`` the sum of debits (a positive number),
    ``net = inflow - outflow``; ``n_credits``, ``n_debits``, ``n_transactions`` count rows.

    Result: ``{"net": float, "inflow": float, "outflow": float, "n_credits": int,
    "n_debits": int, "n_transactions": int}``.
    """

    name = "net_flow"
    category = "flows"
    root_data = ("transactions",)

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        signed = [_signed_cents(r) for r in ctx.root["transactions"]]
        inflow = sum(s for s in signed if s > 0)
        outflow = -sum(s for s in signed if s < 0)
        return {
            "net": (inflow - outflow) / 100,
            "inflow": inflow / 100,
            "outflow": outflow / 100,
            "n_credits": sum(1 for s in signed if s > 0),
            "n_debits": sum(1 for s in signed if s < 0),
            "n_transactions": len(signed),
        }


class Flows30d(StandardCalculation):
    """Inflow and outflow of the account over the last 30 available dates, in CZK.

    Sums over ``ctx.history`` (the last ``window`` available dates, today included; every
    calendar day is available in the Berka data, so this is 30 calendar days).
    ``active_days_30d`` counts the dates with at least one transaction. Only computed on the
    dates the account has transactions.

    Result: ``{"inflow_30d": float, "outflow_30d": float, "net_30d": float,
    "n_transactions_30d": int, "active_days_30d": int}``.
    """

    name = "flows_30d"
    category = "flows"
    root_data = ("transactions",)
    window = 30
    lookback = window

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        rows = ctx.history["transactions"]
        signed = [_signed_cents(r) for r in rows]
        inflow = sum(s for s in signed if s > 0)
        outflow = -sum(s for s in signed if s < 0)
        return {
            "inflow_30d": inflow / 100,
            "outflow_30d": outflow / 100,
            "net_30d": (inflow - outflow) / 100,
            "n_transactions_30d": len(rows),
            "active_days_30d": len({r["date"] for r in rows}),
        }


class Overdraft(StandardCalculation):
    """Whether the account ended the day overdrawn (end-of-day ``balance < 0``).

    ``shortfall = max(0, -balance)`` in CZK. Intraday dips below zero that are repaid the same
    day do not count: the order within a day is unknown (data README §2.1). An account whose
    balance is ``None`` (ambiguous day) gets no result rather than a guess.

    Result: ``{"overdraft": bool, "balance": float, "shortfall": float}``.
    """

    name = "overdraft"
    flatline_ok = ("shortfall",)  # 0.0 for every account on most days: overdrafts are rare
    category = "risk"
    dependencies = ("balance",)

    def process(self, ctx: StandardContext) -> dict[str, Any] | None:
        result = ctx.upstream.get("balance")
        if not result or result.get("balance") is None:
            return None
        balance = float(result["balance"])
        return {"overdraft": balance < 0, "balance": balance, "shortfall": max(0.0, -balance)}
