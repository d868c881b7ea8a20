"""Bank-wide (meta) summary of the day's account results."""

from __future__ import annotations

from typing import Any

from orchestrator.calculation import MetaCalculation, MetaContext


def _cents(value: Any) -> int:
    return round(float(value) * 100)


class BankSummary(MetaCalculation):
    """The day's totals over all accounts, plus the bank's last known balances.

    Today's activity, from the accounts with transactions on the date:
    ``active_accounts`` (accounts with a ``net_flow`` result), ``inflow``, ``outflow``, ``net``
    (CZK, sums of their ``net_flow``), ``overdrawn_active`` (of those, how many ended the day
    below zero according to ``balance``).

    Bank-wide stock: an account's balance does not change on a day without transactions, so the
    last known end-of-day balance of every account seen so far is carried in
    ``last_balances`` through ``ctx.previous`` (``historical = True``) and updated with today's
    ``balance`` results. ``bank_balance`` is their sum (CZK), ``accounts_known`` their number,
    ``overdrawn_accounts`` how many are below zero. An account whose balance is ``None`` today
    (ambiguous day) keeps its older value. Without a previous result (the first date, or after
    a date with no result) the stock starts again from today's accounts.

    Result: ``{"active_accounts": int, "inflow": float, "outflow": float, "net": float,
    "overdrawn_active": int, "accounts_known": int, "bank_balance": float,
    "overdrawn_accounts": int, "last_balances": {account: float}}``.
    """

    name = "bank_summary"
    category = "bank"
    dependencies = ("balance", "net_flow")
    historical = True

    def process(self, ctx: MetaContext) -> dict[str, Any]:
        balances = {
            user: float(r["balance"])
            for user, r in (ctx.upstream["balance"] or {}).items()
            if r is not None and r.get("balance") is not None
        }
        flows = [r for r in (ctx.upstream["net_flow"] or {}).values() if r is not None]
        previous = (ctx.previous or {}).get("last_balances") or {}
        last = {**previous, **balances}
        inflow = sum(_cents(r["inflow"]) for r in flows)
        outflow = sum(_cents(r["outflow"]) for r in flows)
        return {
            "active_accounts": len(flows),
            "inflow": inflow / 100,
            "outflow": outflow / 100,
            "net": (inflow - outflow) / 100,
            "overdrawn_active": sum(1 for b in balances.values() if b < 0),
            "accounts_known": len(last),
            "bank_balance": sum(_cents(b) for b in last.values()) / 100,
            "overdrawn_accounts": sum(1 for b in last.values() if b < 0),
            "last_balances": dict(sorted(last.items())),
        }
