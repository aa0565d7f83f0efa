#!/usr/bin/env bash
# Start or stop the test S3 server (moto, see s3_server.py) on 127.0.0.1 and a free port.
#
#   scripts/s3-server.sh start [--parent-pid PID]   prints `export …` lines for the S3 settings
#   scripts/s3-server.sh stop [PID]                 stops that server, or the one started last
#   scripts/s3-server.sh python ARGS…               runs the server's Python (with boto3)
#
# The server has one bucket, `wasnap`, made at start (s3://wasnap/PREFIX); it keeps its
# objects in memory, so a stop forgets them. Its Python environment (made on first use
# from s3-requirements.txt), its logs and its PID live outside the repository (see
# server-state.sh: ~/.cache/wasnap by default).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/server-state.sh"
state="$(state_base)/s3-server"

case "${1:-}" in
  start)
    shift
    mkdir -p "$state"
    exec 9>"$state/.lock"
    flock 9
    venv="$(venv_for s3-server "$root/scripts/s3-requirements.txt")"
    forget_old_runs "$state"
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
      stop_pid "$2" s3_server.py
    elif [ -f "$state/pid" ]; then
      stop_pid "$(cat "$state/pid")" s3_server.py
      rm -f "$state/pid"
    fi
    ;;
  python)
    shift
    exec "$(venv_for s3-server "$root/scripts/s3-requirements.txt")/bin/python" "$@"
    ;;
  *)
    echo "usage: $0 start [--parent-pid PID] | stop [PID] | python ARGS…" >&2
    exit 2
    ;;
esac
