#!/usr/bin/env bash
# Start or stop the test S3 server (moto, see s3_server.py) on 127.0.0.1 and a free port.
#
#   scripts/s3-server.sh start [--parent-pid PID]   prints `export …` lines for the S3 settings
#   scripts/s3-server.sh stop [PID]                 stops that server, or the one started last
#
# The server has one bucket, `wasnap`, made at start (s3://wasnap/PREFIX); it keeps its
# objects in memory, so a stop forgets them. Its Python environment (made on first use
# from s3-requirements.txt), its logs and its PID live outside the repository, under
# $WASNAP_STATE_DIR (default: ${XDG_CACHE_HOME:-~/.cache}/wasnap).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
base="${WASNAP_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wasnap}"
state="$base/s3-server"
venv="$base/s3-venv"

ensure_venv() {
  local stamp="$venv/.requirements"
  if ! cmp -s "$root/scripts/s3-requirements.txt" "$stamp" 2>/dev/null; then
    echo "s3-server: installing moto into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/scripts/s3-requirements.txt" >&2
    cp "$root/scripts/s3-requirements.txt" "$stamp"
  fi
}

case "${1:-}" in
  start)
    shift
    mkdir -p "$state"
    exec 9>"$state/.lock"
    flock 9
    ensure_venv
    run_dir="$(mktemp -d "$state/run.XXXXXX")"
    # The lock serialises set-up only: the server must not inherit it (9>&-), or a second
    # start would wait for as long as the first server lives.
    "$venv/bin/python" "$root/scripts/s3_server.py" --port-file "$run_dir/port" --bucket wasnap "$@" \
      >"$run_dir/log" 2>&1 9>&- &
    pid=$!
    for _ in $(seq 1 300); do
      [ -f "$run_dir/port" ] && break
      kill -0 "$pid" 2>/dev/null || { cat "$run_dir/log" >&2; echo "s3-server: failed to start" >&2; exit 1; }
      sleep 0.1
    done
    [ -f "$run_dir/port" ] || { echo "s3-server: no port after 30 s" >&2; kill "$pid"; exit 1; }
    echo "$pid" >"$state/pid"
    echo "s3-server: moto on port $(cat "$run_dir/port") (pid $pid, log $run_dir/log); stop it with: $0 stop $pid" >&2
    cat <<EXPORTS
export AWS_ENDPOINT=http://127.0.0.1:$(cat "$run_dir/port")
export AWS_ALLOW_HTTP=true
export AWS_ACCESS_KEY_ID=wasnap-test-key
export AWS_SECRET_ACCESS_KEY=wasnap-test-secret
export AWS_REGION=us-east-1
export WASNAP_TEST_S3_BUCKET=wasnap
export WASNAP_TEST_S3_PID=$pid
EXPORTS
    ;;
  stop)
    if [ -n "${2:-}" ]; then
      kill "$2" 2>/dev/null || true
    elif [ -f "$state/pid" ]; then
      kill "$(cat "$state/pid")" 2>/dev/null || true
      rm -f "$state/pid"
    fi
    ;;
  *)
    echo "usage: $0 start [--parent-pid PID] | stop [PID]" >&2
    exit 2
    ;;
esac
