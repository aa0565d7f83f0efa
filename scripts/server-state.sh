# Sourced by s3-server.sh and kafka-server.sh: where a test server keeps its Python
# environment, its data and its logs, outside the repository.
#
#   $WASNAP_STATE_DIR, else $XDG_CACHE_HOME/wasnap, else ~/.cache/wasnap when the home
#   directory is writable, else ${TMPDIR:-/tmp}/wasnap-UID.
#
# Each server's Python environment is named by the hash of its requirements, so checkouts
# that pin different versions never install into one another's. Runs (a data directory
# and a log each) older than 12 hours are deleted when a server starts.

# state_base: print the base directory, made if missing.
state_base() {
  local base
  if [ -n "${WASNAP_STATE_DIR:-}" ]; then
    base="$WASNAP_STATE_DIR"
  elif [ -n "${XDG_CACHE_HOME:-}" ]; then
    base="$XDG_CACHE_HOME/wasnap"
  elif [ -n "${HOME:-}" ] && [ -w "$HOME" ]; then
    base="$HOME/.cache/wasnap"
  else
    base="${TMPDIR:-/tmp}/wasnap-$(id -u)"
  fi
  mkdir -p "$base" || { echo "cannot make $base: set WASNAP_STATE_DIR to a writable directory" >&2; return 1; }
  echo "$base"
}

# venv_for NAME REQUIREMENTS: print the path of NAME's Python environment for those
# requirements, installing it on first use.
venv_for() {
  local name="$1" requirements="$2" base venv
  base="$(state_base)"
  venv="$base/$name-venv-$(sha256sum "$requirements" | cut -c1-12)"
  if [ ! -f "$venv/.installed" ]; then
    echo "$name: installing $(grep -v '^#' "$requirements" | tr '\n' ' ')into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2
    touch "$venv/.installed"
  fi
  echo "$venv"
}

# forget_old_runs DIR: delete run.* directories under DIR older than 12 hours.
forget_old_runs() {
  find "$1" -maxdepth 1 -name 'run.*' -mmin +720 -exec rm -rf {} + 2>/dev/null || true
}

# stop_pid PID PATTERN: stop PID if its command line mentions PATTERN (a PID reused by
# another program is left alone).
stop_pid() {
  if tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"; then
    kill "$1" 2>/dev/null || true
  fi
}
