#!/usr/bin/env bash
# Seed §4.7 change workflow drill. Success line: runbook_change_workflow_ok=true
# Full verification apply: RUNBOOK_SKIP_VERIFICATION=false ./runbooks/change_workflow.sh
exec "$(dirname "$0")/_spotex.sh" change-workflow "$@"
