#!/usr/bin/env bash
# Seed §4.9 adversarial reliability drill: policy tamper, WS resume gap, hostile candle queries,
# snapshot tamper, exactly-once (small) as one bundle. Success line:
# runbook_adversarial_reliability_ok=true (RUNBOOK_ALLOW_ADVERSARIAL_FAIL=true: a failure is recorded,
# exit 0). Options: --eo-trades N (default 2000), --ws-commands N (default 3000).
exec "$(dirname "$0")/_spotex.sh" adversarial-reliability "$@"
