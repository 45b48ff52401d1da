#!/usr/bin/env bash
# Seed §4.6 audit-chain tamper drill. Success line: runbook_audit_tamper_ok=true
exec "$(dirname "$0")/_spotex.sh" audit-chain-tamper "$@"
