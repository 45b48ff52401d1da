#!/usr/bin/env bash
# Seed §4.12 Kafka network partition drill. Success line: runbook_network_partition_ok=true
exec "$(dirname "$0")/_spotex.sh" network-partition "$@"
