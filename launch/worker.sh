#!/usr/bin/env bash
# Runs on every TPU VM worker, from ~/maxgemma; launch/tpu.py calls it over `gcloud ... ssh`.
#   worker.sh start RUN CMD [ARG...]   start CMD in the background in its own session; its output
#                                      goes to logs/RUN.log, its pid to logs/RUN.pid and, when it
#                                      ends, its exit code to logs/RUN.exit
#   worker.sh stream RUN               follow logs/RUN.log until the run ends; exit with its code
#                                      (255 when unknown: killed, or never started)
#   worker.sh stop RUN [GRACE_S]        SIGTERM to the run's process group, SIGKILL after GRACE_S
#                                      (default 30: jax catches SIGTERM as a preemption notice)
#   worker.sh status RUN | logs RUN LINES [follow]
# Arguments are used as given ("$@"): nothing here re-parses them.
set -u
what=${1:?usage: worker.sh start|stream|status|stop|logs RUN ...}
run=${2:?usage: worker.sh $what RUN ...}
shift 2
log=logs/$run.log
pid=logs/$run.pid
code=logs/$run.exit
host=$(hostname)
# The run is alive while any process of its process group is (setsid: group id = the pid saved).
alive() { [ -f "$pid" ] && kill -0 -- "-$(cat "$pid")" 2>/dev/null; }
mkdir -p logs

case $what in
  start)
    [ $# -gt 0 ] || { echo "$host: worker.sh start $run: no command" >&2; exit 2; }
    if alive; then
      echo "$host: run $run is still active (pid $(cat "$pid")): 'python -m launch.tpu stop' first" >&2
      exit 3
    fi
    rm -f "$code"
    if [ -f "$log" ]; then mv "$log" "$log.$(date +%Y%m%d-%H%M%S)"; fi
    # setsid: the run is a process group of its own, so `stop` ends the trainer and its children.
    setsid nohup bash -c '"$@"; echo $? > "$0"' "$code" "$@" > "$log" 2>&1 < /dev/null &
    echo $! > "$pid"
    echo "$host: started $run (pid $!)"
    ;;
  stream)
    [ -f "$pid" ] || { echo "$host: run $run was never started" >&2; exit 255; }
    tail -n +1 -F --pid="$(cat "$pid")" "$log"
    exit "$(cat "$code" 2>/dev/null || echo 255)"
    ;;
  status)
    if alive; then
      echo "$host: $run running (pid $(cat "$pid")): $(tail -n 1 "$log" 2>/dev/null)"
    elif [ -f "$code" ]; then
      echo "$host: $run finished with exit code $(cat "$code")"
    elif [ -f "$pid" ]; then
      echo "$host: $run was stopped or killed"
    else
      echo "$host: $run never started"
    fi
    ;;
  stop)
    grace=${1:-30}
    if ! alive; then echo "$host: $run was not running"; exit 0; fi
    group=$(cat "$pid")
    kill -TERM -- "-$group" 2>/dev/null
    for _ in $(seq $((grace * 10))); do alive || break; sleep 0.1; done
    if alive; then
      kill -KILL -- "-$group" 2>/dev/null
      for _ in $(seq 50); do alive || break; sleep 0.1; done
      echo "$host: $run ignored SIGTERM for ${grace}s: sent SIGKILL to process group $group"
    else
      echo "$host: stopped $run (process group $group)"
    fi
    ;;
  logs)
    lines=${1:-100}
    if [ "${2:-}" = follow ]; then exec tail -n "$lines" -F "$log"; fi
    exec tail -n "$lines" "$log"
    ;;
  *)
    echo "worker.sh: unknown subcommand $what" >&2
    exit 2
    ;;
esac
