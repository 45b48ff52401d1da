#!/usr/bin/env bash
# Seed §4.12 Kafka network partition (same as runbooks/network_partition.sh). Success line: runbook_network_partition_ok=true
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec "$root/runbooks/_spotex.sh" network-partition "$@"
