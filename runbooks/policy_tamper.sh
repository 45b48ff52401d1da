#!/usr/bin/env bash
# Seed §4.11 policy tamper drill. Success line: runbook_policy_tamper_ok=true
# (RUNBOOK_ALLOW_POLICY_TAMPER_FAIL=true: a failure is recorded, exit 0).
exec "$(dirname "$0")/_spotex.sh" policy-tamper "$@"
