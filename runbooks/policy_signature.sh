#!/usr/bin/env bash
# Seed §4.10 policy signature drill. Success line: runbook_policy_signature_ok=true
# (RUNBOOK_ALLOW_POLICY_FAIL=true: a failure is recorded, exit 0).
exec "$(dirname "$0")/_spotex.sh" policy-signature "$@"
