#!/usr/bin/env bash
# Seed §4.13 broker bounce (same as runbooks/redpanda_broker_bounce.sh). Success line: runbook_redpanda_broker_bounce_ok=true
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec "$root/runbooks/_spotex.sh" redpanda-broker-bounce "$@"
