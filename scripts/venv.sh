# Sourced by scripts/test and scripts/demo: makes $VENV (default .venv) with the project installed,
# reinstalling only when pyproject.toml changes. pip's and the build backend's chatter goes to a log,
# shown only when the install fails, so the first screen of the demo is the demo.
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  printf 'installing the project and its dependencies into %s ...\n' "$VENV" >&2
  log="$VENV/install.log"
  if ! { "$VENV/bin/python" -m pip install --quiet --upgrade pip \
      && "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]"; } >"$log" 2>&1; then
    cat "$log" >&2
    printf 'the install failed; its log is %s\n' "$log" >&2
    exit 1
  fi
  touch "$stamp"
fi
