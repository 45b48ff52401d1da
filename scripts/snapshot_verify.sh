#!/usr/bin/env bash
# Seed snapshot verify rehearsal: spotex core verify-snapshot [--snapshot-uri URI] [--sha256-file F]. Success line: snapshot_verify_ok=true (build/snapshot/snapshot-verify-latest.json)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" core verify-snapshot "$@"
