#!/usr/bin/env bash
# Seed §4.1 core only: the leading core kill -9ed under load; the recovered state hash equals the pre-crash WAL hash. Success line: core_kill_recover_ok=true
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec "$root/runbooks/_spotex.sh" core-kill-recover "$@"
