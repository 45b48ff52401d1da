# Sourced by the seed-named shell entrypoints (runbooks/, scripts/) after they set $root: sets
# $spotex to the project's CLI (SPOTEX_BIN, else the project's venv, else PATH) or exits 1.
spotex="${SPOTEX_BIN:-$root/.venv/bin/spotex}"
[ -x "$spotex" ] || spotex="$(command -v spotex || true)"
if [ -z "$spotex" ]; then
  echo "spotex: not installed; run 'make run' or 'make test' once first" >&2
  exit 1
fi
