#!/usr/bin/env bash
# Seed §4.0 PII log scan gate: every line of the stack's logs (SPOTEX_DATA_DIR/logs, or the files and
# directories given) against the PII/secrets policy (docs/security.md "PII log scan gate").
# One line per finding (file:line: kind: redacted excerpt), then pii_log_scan_ok=true|false;
# exit 1 on any finding. Evidence: build/security/pii-log-scan.json (override with --out).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" logs pii-scan "$@"
