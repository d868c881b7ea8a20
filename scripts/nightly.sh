#!/usr/bin/env bash
# Cron entry point of the nightly job. Runs the plan up to yesterday (UTC) for one config and
# keeps a log per day. Exit code: 0 only when every cell is complete and clean; 1 when not
# (failed cells or users, dead letters, cells blocked by a failure: one summary line each in
# the log); 2 configuration/lock error.
#
#   crontab:  30 2 * * *  /path/to/orchestrator/scripts/nightly.sh /path/to/orchestrator.toml
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
config="${1:-$here/orchestrator.toml}"
logdir="${ORCHESTRATOR_LOG_DIR:-$here/logs}"
mkdir -p "$logdir"
exec "$here/.venv/bin/orchestrator" --config "$config" run --trigger cron \
  >>"$logdir/nightly-$(date -u +%F).log" 2>&1
