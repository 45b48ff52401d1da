#!/usr/bin/env bash
# Seed §4.0 PII log scan gate: every line of the stack's logs (SPOTEX_DATA_DIR/logs, or the files and
# directories given) against the PII/secrets policy (docs/security.md "PII log scan gate").
# One line per finding (file:line: kind: redacted excerpt), then pii_log_scan_ok=true|false;
# exit 1 on any finding. Evidence: build/security/pii-log-scan.json (override with --out).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
spotex="${SPOTEX_BIN:-$root/.venv/bin/spotex}"
[ -x "$spotex" ] || spotex="$(command -v spotex || true)"
if [ -z "$spotex" ]; then
  echo "spotex: not installed; run 'make run' or 'make test' once first" >&2
  exit 1
fi
exec "$spotex" logs pii-scan "$@"
