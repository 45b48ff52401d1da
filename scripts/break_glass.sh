#!/usr/bin/env bash
# Seed §4.0 break-glass workflow, through the edge's operator-signed admin API (audited):
#   ./scripts/break_glass.sh enable --ttl-sec 900 --actor <oncall> --reason <incident> [--ticket T]
#   ./scripts/break_glass.sh status
#   ./scripts/break_glass.sh disable --actor <oncall> --reason <resolved>
# The operator key: SPOTEX_OPERATOR_KEY (a file or the hex key) or --operator-key FILE.
# The stack: SPOTEX_DATA_DIR (or --data-dir / --edge-url). Errors: one line on stderr, exit 1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
if [ $# -lt 1 ]; then
  echo "usage: $0 enable|status|disable [--ttl-sec N] [--actor A] [--reason R] [--ticket T]" >&2
  exit 2
fi
exec "$spotex" admin break-glass "$@"
