#!/usr/bin/env bash
# An autoscaling Ray cluster on this one machine: a 0-CPU head whose autoscaler (Ray's `fake_multinode` provider,
# cluster/local-autoscaler.yaml) starts 1-CPU worker "nodes" (extra raylets) when jobs need them and stops them
# when they have been idle for the config's idle timeout. Everything listens on 127.0.0.1.
#
#   bash scripts/local-cluster.sh up       # start the head; prints the address to submit jobs to
#   bash scripts/local-cluster.sh status   # nodes, resources, pending demand, the autoscaler's last decisions
#   bash scripts/local-cluster.sh down     # stop the head and every node it launched, nothing else
#   bash scripts/local-cluster.sh address  # the job server's address: export RAY_ADDRESS=$(... address)
#
# State (ports, pids, the rendered autoscaler config, Ray's --temp-dir with every log) lives in
# $OTMEL_LOCAL_CLUSTER_DIR (default /tmp/otlc-$UID; keep it short: Ray's socket paths are length-limited).
# `down` stops exactly the processes of this cluster: those started with its marker in their environment
# (OTMEL_LOCAL_CLUSTER=<state dir>; every process Ray starts inherits it, the autoscaler's nodes included), those
# whose command line names its temp dir, and their descendants. It never stops another Ray on the machine.
# Optional: OTMEL_LOCAL_IDLE_MINUTES (idle timeout, default the YAML's), OTMEL_LOCAL_MAX_WORKERS,
# OTMEL_LOCAL_DASHBOARD_PORT (default 8265 if free, else a free port; 0: a free port).
# The workflow, with a training run and a sweep: docs/scale-out.md, "The cluster workflow on one machine".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${OTMEL_LOCAL_CLUSTER_DIR:-/tmp/otlc-$(id -u)}
VENV=${OTMEL_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
TEMP=$DIR/ray
STATE=$DIR/state.env
# loopback only (Ray binds 127.0.0.1 when this is 0 and the node address is 127.0.0.1); no token auth
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled

usage() { echo "usage: bash scripts/local-cluster.sh up|down|status|address" >&2; exit 2; }
[ $# -eq 1 ] || usage
[ -x "$PY" ] || { echo "local-cluster: no $PY: run bash scripts/setup.sh first" >&2; exit 2; }

# The process helper: which processes belong to this cluster (marker in the environment, temp dir in the command
# line, or a descendant of either), and stopping them (autoscaler first, then SIGTERM, then SIGKILL).
helper() {
    OTLC_DIR=$DIR OTLC_TEMP=$TEMP "$PY" - "$@" <<'PY'
import os, signal, socket, sys, time
import psutil

cmd, DIR, TEMP = sys.argv[1], os.environ["OTLC_DIR"], os.environ["OTLC_TEMP"]
me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}

def ours() -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        if p.pid in me:
            continue
        try:
            if p.environ().get("OTMEL_LOCAL_CLUSTER") == DIR or any(TEMP + "/" in a or a.endswith(TEMP)
                                                                   for a in p.cmdline()):
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                if c.pid not in me:
                    found.setdefault(c.pid, c)
        except psutil.NoSuchProcess:
            pass
    return list(found.values())

def name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:200]
    except psutil.Error:
        return "?"

if cmd == "ports":  # free loopback ports: GCS, dashboard, client server, dashboard agent
    want = os.environ.get("OTMEL_LOCAL_DASHBOARD_PORT", "")
    socks = []
    for _ in range(4):
        s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    if want == "":
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 8265)); ports[1] = 8265
            except OSError:
                pass
    elif want != "0":
        ports[1] = int(want)
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))
elif cmd == "render":  # the autoscaler config with this head's GCS address (and the optional overrides)
    import yaml
    src, dst, gcs = sys.argv[2:5]
    cfg = yaml.safe_load(open(src))
    cfg["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    if os.environ.get("OTMEL_LOCAL_IDLE_MINUTES"):
        cfg["idle_timeout_minutes"] = float(os.environ["OTMEL_LOCAL_IDLE_MINUTES"])
    if os.environ.get("OTMEL_LOCAL_MAX_WORKERS"):
        n = int(os.environ["OTMEL_LOCAL_MAX_WORKERS"])
        cfg["max_workers"] = n
        for t, spec in cfg["available_node_types"].items():
            if t != cfg["head_node_type"]:
                spec["max_workers"] = n
    yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
    print(cfg["idle_timeout_minutes"], cfg["max_workers"])
elif cmd == "alive":  # exit 0 when the recorded GCS server runs and is this cluster's
    pid = int(sys.argv[2] or 0)
    try:
        p = psutil.Process(pid)
        ok = p.status() != psutil.STATUS_ZOMBIE and any(TEMP in a for a in p.cmdline())
    except (psutil.Error, ValueError):
        ok = False
    sys.exit(0 if ok else 1)
elif cmd == "gcs-pid":
    pids = [p.pid for p in ours() if "gcs_server" in name(p).split(" ")[0]]
    print(pids[0] if pids else "")
elif cmd == "list":
    for p in sorted(ours(), key=lambda p: p.pid):
        print(p.pid, name(p))
elif cmd == "stop":
    procs = ours()
    if not procs:
        print("0")
        sys.exit(0)
    # Ray's own order: the autoscaler (so it starts no node meanwhile), then the raylets (each stops its workers
    # and agents), then the rest (GCS, dashboard, log monitor, anything left); SIGKILL after a grace period
    def is_raylet(p: psutil.Process) -> bool:
        return name(p).split(" ")[0].endswith("/raylet")
    first = [p for p in procs if "autoscaler/_private/monitor.py" in name(p)]
    raylets = [p for p in procs if is_raylet(p)]
    rest = [p for p in procs if p not in first and p not in raylets]
    for group, grace in ((first, 3), (raylets, 5), (rest, 5)):
        for p in group:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(group, timeout=grace)
        for p in left:
            if os.environ.get("OTLC_DEBUG"):
                print("SIGKILL", p.pid, name(p), file=sys.stderr)
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
    # processes started while we stopped the others (a worker a raylet was spawning), then anything left
    for _ in range(3):
        late = ours()
        if not late:
            break
        for p in late:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(late, timeout=10)
        procs += late
    print(len({p.pid for p in procs}))
PY
}

load_state() {
    # shellcheck disable=SC1090
    [ -f "$STATE" ] && . "$STATE"
    return 0
}

is_up() {
    load_state
    [ -n "${GCS_PID:-}" ] && helper alive "$GCS_PID"
}

print_use() {
    cat <<EOF
local Ray cluster up (state: $DIR)
  head:        0 CPUs on 127.0.0.1, GCS $GCS_ADDRESS
  autoscaler:  up to $MAX_WORKERS worker node(s) of type cpu_1x (1 CPU each), an idle node stops after $IDLE_MINUTES min
  dashboard:   http://127.0.0.1:$DASHBOARD_PORT   (jobs, nodes, logs)
  export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT      (or: export RAY_ADDRESS=\$(bash scripts/local-cluster.sh address))
  submit:      .venv/bin/ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir local://$ROOT -- python ray_jobs/train.py train.epochs=2
               (local://: the repository in place; every node is this machine, see docs/scale-out.md)
  autoscaler log: $SESSION_DIR/logs/monitor.log
  bash scripts/local-cluster.sh status   |   bash scripts/local-cluster.sh down
EOF
}

cmd_up() {
    if is_up; then
        echo "local cluster already up"
        print_use
        return 0
    fi
    mkdir -p "$DIR"
    if [ -f "$STATE" ] || [ -d "$TEMP" ]; then  # a previous cluster that died or was killed: clear what is left
        n=$(helper stop)
        [ "$n" = 0 ] || echo "stopped $n process(es) left from an earlier local cluster under $DIR"
        rm -rf "$TEMP" "$STATE"
    fi
    if [ ${#TEMP} -gt 60 ]; then
        echo "local-cluster: state dir $DIR is too long for Ray's socket paths; use a short OTMEL_LOCAL_CLUSTER_DIR" >&2
        exit 2
    fi
    read -r GCS_PORT DASHBOARD_PORT CLIENT_PORT AGENT_PORT < <(helper ports)
    read -r IDLE_MINUTES MAX_WORKERS < <(helper render "$ROOT/cluster/local-autoscaler.yaml" "$DIR/autoscaler.yaml" "$GCS_PORT")
    # The job's `python` is the first one on the PATH that `ray start` had: the venv's. Every process of the
    # cluster inherits OTMEL_LOCAL_CLUSTER (how `down` finds them) and the loopback setting exported above.
    if ! env PATH="$VENV/bin:$PATH" OTMEL_LOCAL_CLUSTER="$DIR" RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 \
        DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false \
        "$VENV/bin/ray" start --head --num-cpus=0 --object-store-memory=200000000 \
        --autoscaling-config="$DIR/autoscaler.yaml" --temp-dir="$TEMP" \
        --node-ip-address 127.0.0.1 --port "$GCS_PORT" --ray-client-server-port "$CLIENT_PORT" \
        --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
        --disable-usage-stats > "$DIR/start.log" 2>&1; then
        echo "local-cluster: ray start failed; its output ($DIR/start.log):" >&2
        tail -n 30 "$DIR/start.log" >&2
        helper stop > /dev/null
        exit 1
    fi
    SESSION_DIR=$(readlink -f "$TEMP/session_latest")
    GCS_ADDRESS=127.0.0.1:$GCS_PORT
    GCS_PID=$(helper gcs-pid)
    cat > "$STATE" <<EOF
GCS_ADDRESS=$GCS_ADDRESS
GCS_PID=$GCS_PID
DASHBOARD_PORT=$DASHBOARD_PORT
RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
SESSION_DIR=$SESSION_DIR
IDLE_MINUTES=$IDLE_MINUTES
MAX_WORKERS=$MAX_WORKERS
EOF
    helper list > "$DIR/head-pids.txt"
    print_use
}

cmd_down() {
    # by the marker and the temp dir, not the state file: also a cluster whose state dir was deleted under it
    n=$(helper stop)
    rm -f "$STATE"
    if [ "$n" = 0 ]; then
        echo "no local cluster running under $DIR: nothing to stop"
    else
        echo "local cluster down: stopped $n process(es)$([ -d "$TEMP" ] && echo " (logs kept in $TEMP)")"
    fi
}

cmd_status() {
    if ! is_up; then
        echo "no local cluster running under $DIR (bash scripts/local-cluster.sh up)"
        return 1
    fi
    print_use
    echo
    "$VENV/bin/ray" status --address "$GCS_ADDRESS" || true
    echo "last autoscaler decisions ($SESSION_DIR/logs/monitor.log):"
    grep -E "new nodes for launch|Launching [0-9]+ nodes|Terminating the node|Removing [0-9]+ nodes" \
        "$SESSION_DIR/logs/monitor.log" 2>/dev/null \
        | tail -n 8 | sed 's/^/  /' || true
}

cmd_address() {
    if ! is_up; then
        echo "no local cluster running under $DIR (bash scripts/local-cluster.sh up)" >&2
        return 1
    fi
    echo "$RAY_ADDRESS"
}

case "$1" in
    up) cmd_up ;;
    address) cmd_address ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) usage ;;
esac
