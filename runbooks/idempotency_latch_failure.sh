#!/usr/bin/env bash
# Seed §4.0 idempotency+latch failure drill. Success line: runbook_idempotency_latch_failure_ok=true
exec "$(dirname "$0")/_spotex.sh" idempotency-latch-failure "$@"
