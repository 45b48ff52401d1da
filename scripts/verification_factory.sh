#!/usr/bin/env bash
# Seed §4.0 shared verification bundle: the quick always-on checks (audit chains --require-events,
# PII log scan, ledger invariants, safety budget, status) against the stack in SPOTEX_DATA_DIR (else a
# fresh one), plus each drill selected by a flag: --run-startup-guardrails, --run-change-workflow,
# --run-policy-signature, --run-policy-tamper, --run-network-partition, --run-redpanda-bounce,
# --run-exactly-once-runbook (--eom-trades N, default 20000), --run-mapping-integrity-runbook (reported
# not_available: no such drill), --run-idempotency-latch-runbook, --run-determinism,
# --run-exactly-once-million, --run-adversarial, --all. Report: build/verification/
# verification-factory-<stamp>.json and -latest.json. Success line: verification_factory_ok=true
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
args=(drill verification-factory --out "$root/build/verification" --runbooks-out "$root/build/runbooks")
if [ -n "${SPOTEX_DATA_DIR:-}" ] && "$spotex" status --data-dir "$SPOTEX_DATA_DIR" >/dev/null 2>&1; then
  args+=(--data-dir "$SPOTEX_DATA_DIR")
fi
for a in "$@"; do
  case "$a" in
    --run-*) args+=(--run "${a#--run-}") ;;
    *) args+=("$a") ;;
  esac
done
exec "$spotex" "${args[@]}"
