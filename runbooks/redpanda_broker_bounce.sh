#!/usr/bin/env bash
# Seed §4.13 Redpanda broker bounce drill. Success line: runbook_redpanda_broker_bounce_ok=true
exec "$(dirname "$0")/_spotex.sh" redpanda-broker-bounce "$@"
