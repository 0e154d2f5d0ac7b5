#!/usr/bin/env bash
# A multi-node Ray cluster on this machine: one head and N worker nodes, each its own raylet, for
# trying the multi-node path (SPREAD placement, one Prometheus endpoint per node, `ray job submit`)
# without a cloud.
#
#   cluster/local.sh up [--workers N] [--cpus C] [--port P] [--object-store-mb M] [--state DIR]
#   cluster/local.sh status [--state DIR]
#   cluster/local.sh down [--state DIR]
#   cluster/local.sh --help
#
# up      starts the head and N worker nodes (default 2, so 3 nodes), C logical CPUs each (default 2),
#         waits until every node is alive and the head's job agent answers, and prints RAY_ADDRESS,
#         the dashboard, each node's metrics endpoint and the submit command.
# status  lists the cluster's nodes (state API).
# down    stops exactly the processes `up` started (each node's process group, then anything left
#         that runs from this cluster's temp dirs); never `ray stop`, which stops every Ray on the
#         machine.
#
# Ports: node i (0 = head) takes P+10i .. P+10i+8 (default P = 6390): the GCS (head: P), the
# dashboard (head: P+1), the Ray client server (head: P+8), and on every node its node manager,
# object manager, metrics export, dashboard agent (HTTP and gRPC) and runtime-env agent ports. All
# are checked free before anything starts, so the cluster never collides with another Ray here
# (but for Ray's fixed dashboard and autoscaler metrics ports, 44227 and 44217). Every node's IP is
# 127.0.0.1, so every port of the cluster binds to 127.0.0.1 only: nothing answers from another
# machine. A client of the GCS (not of the dashboard) needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# (in DIR/env). Token authentication is on (RAY_AUTH_MODE=token on every node): the token is
# ~/.ray/auth_token (made if missing), and clients send it with RAY_AUTH_MODE=token.
#
# State (pids, logs, runtime_env.yaml and each node's own Ray temp dir: nodes on one machine must
# not share one, or one node's runtime-env agent deletes a job's working dir that another node's
# processes still run in) lives in DIR (RAY_RESNET_LOCAL_STATE, default /tmp/ray-resnet-local);
# keep it short: Ray's socket paths under it must stay < 108 bytes.
# The nodes inherit this shell's RAY_RESNET_HOME (default ~/ray-resnet), where jobs keep shards,
# checkpoints and the MLflow store: one machine, so the SQLite store needs no server. Their Ray and
# Python: RAY_RESNET_BIN if set, else the checkout's .venv/bin, else the `ray` on PATH.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-}
shift || true
case "$cmd" in -h|--help|help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
WORKERS=2 CPUS=2 PORT=6390 OBJECT_STORE_MB=1024
STATE=${RAY_RESNET_LOCAL_STATE:-/tmp/ray-resnet-local}
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --object-store-mb) OBJECT_STORE_MB=$2; shift 2 ;;
    --state) STATE=$2; shift 2 ;;
    *) echo "local.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
case "$STATE" in /*) ;; *) STATE=$PWD/$STATE ;; esac

# The nodes' Python: the checkout's .venv if there is one, else the `ray` on PATH. Jobs run the
# `python` first on the nodes' PATH, so this bin dir goes first there.
if [ -n "${RAY_RESNET_BIN:-}" ]; then BIN=$RAY_RESNET_BIN
elif [ -x "$ROOT/.venv/bin/ray" ]; then BIN=$ROOT/.venv/bin
elif command -v ray >/dev/null; then BIN=$(dirname "$(command -v ray)")
else echo "local.sh: no ray found (run ./dev.sh once, or put Ray on PATH)" >&2; exit 1
fi
PY=$BIN/python

node_ports() {  # node index -> "node_manager object_manager metrics agent_http agent_grpc runtime_env"
  local b=$((PORT + 10 * $1))
  echo "$((b + 2)) $((b + 3)) $((b + 4)) $((b + 5)) $((b + 6)) $((b + 7))"
}

pids_alive() {
  local f
  for f in "$STATE"/node-*.pid; do
    [ -e "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && return 0
  done
  return 1
}

up() {
  if pids_alive; then
    echo "local.sh: a cluster from $STATE is running; cluster/local.sh down --state $STATE first" >&2
    exit 1
  fi
  if [ "${#STATE}" -gt 36 ]; then
    echo "local.sh: --state $STATE is too long for Ray's socket paths (36 characters at most)" >&2
    exit 1
  fi
  local dash=$((PORT + 1)) client=$((PORT + 8)) nodes=$((WORKERS + 1)) i
  local ports=("$PORT" "$dash" "$client")
  for ((i = 0; i < nodes; i++)); do ports+=($(node_ports "$i")); done
  "$PY" - "${ports[@]}" <<'EOF'
import socket, sys
busy = []
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no clash
        try:
            s.bind(("", port))
        except OSError:
            busy.append(port)
if busy:
    sys.exit(f"local.sh: port(s) {', '.join(map(str, busy))} in use (another Ray?): choose another --port")
EOF

  # The token every node and client uses: ~/.ray/auth_token, made if this machine has none yet
  # (`ray start` with RAY_AUTH_MODE=token refuses to start without one).
  "$BIN/ray" get-auth-token --generate >/dev/null 2>&1
  rm -rf "$STATE"
  mkdir -p "$STATE/grafana/dashboards"
  # Ray writes its Grafana dashboards into this folder, beside ours, and provisions the folder
  # (session_latest/metrics/grafana/provisioning/dashboards/default.yml points at it).
  cp "$ROOT/cluster/grafana/"*_grafana_dashboard.json "$STATE/grafana/dashboards/"
  # The shipped runtime env with this machine's RAY_RESNET_HOME instead of the clusters' shared storage.
  local home=${RAY_RESNET_HOME:-$HOME/ray-resnet}
  case "$home" in /*) ;; *) home=$PWD/$home ;; esac
  "$PY" - "$ROOT/cluster/runtime_env.yaml" "$STATE/runtime_env.yaml" "$home" <<'EOF'
import sys, yaml
src, dst, home = sys.argv[1:]
env = yaml.safe_load(open(src))
env["env_vars"] = {**env.get("env_vars", {}), "RAY_RESNET_HOME": home}
with open(dst, "w") as f:
    f.write(f"# written by cluster/local.sh up from {src}\n")
    yaml.safe_dump(env, f, sort_keys=False)
EOF

  # The environment every node (and so every job process) inherits.
  export PATH="$BIN:$PATH" RAY_AUTH_MODE=token RAY_RESNET_HOME=$home
  export RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR=$STATE/grafana/dashboards
  # Ray's state API (Ray Train's placement-group cleaner calls it) finds this cluster's dashboard
  # here, not by looking for a running GCS, which fails while other Ray instances run on the machine.
  export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash
  # `down` stops the whole cluster: no 30 s drain per node on SIGTERM (that is for Serve replicas)
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
  unset RAY_ADDRESS

  # Every node's IP is 127.0.0.1, so that Ray binds its servers there instead of on all interfaces
  # (the GCS, raylets, object managers, workers, metrics export, dashboard agents, runtime-env
  # agents, client server: Ray 2.60 binds to loopback only when the node IP is loopback). Ray on
  # Linux turns 127.0.0.1 into the machine's routable address (services.resolve_ip_for_localhost)
  # unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that set `ray start --address` refuses to
  # add a node. So every process of the cluster gets the variable (a driver's ray.init keeps
  # 127.0.0.1), and `ray start` itself runs with the check passed and 127.0.0.1 kept as given.
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  local ray_start=("$PY" -c '
import sys
from ray._private import ray_constants, services
assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER") and hasattr(services, "resolve_ip_for_localhost")
ray_constants.ENABLE_RAY_CLUSTER = True             # a worker node may join
services.resolve_ip_for_localhost = lambda host: host  # 127.0.0.1 stays 127.0.0.1
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()' start)
  local common=(--block --disable-usage-stats --num-cpus="$CPUS" --node-ip-address=127.0.0.1
                --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)))
  start_node() {  # index, extra args...
    local i=$1; shift
    local p=($(node_ports "$i"))
    # its own session (process group), so that `down` stops this node and only this node
    setsid "${ray_start[@]}" "${common[@]}" --temp-dir="$STATE/n$i" --node-manager-port="${p[0]}" --object-manager-port="${p[1]}" \
      --metrics-export-port="${p[2]}" --dashboard-agent-listen-port="${p[3]}" \
      --dashboard-agent-grpc-port="${p[4]}" --runtime-env-agent-port="${p[5]}" \
      --labels="ray-resnet-node=node-$i" "$@" >"$STATE/node-$i.log" 2>&1 </dev/null &
    echo $! >"$STATE/node-$i.pid"
  }
  wait_started() {  # index: `ray start --block` prints this once its processes are up
    local i=$1 deadline=$((SECONDS + 120))
    until grep -q "Ray runtime started" "$STATE/node-$i.log" 2>/dev/null; do
      if ! kill -0 "$(cat "$STATE/node-$i.pid")" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
        echo "local.sh: node $i did not start; its log ($STATE/node-$i.log) ends:" >&2
        tail -20 "$STATE/node-$i.log" >&2
        down >/dev/null 2>&1 || true
        exit 1
      fi
      sleep 1
    done
  }

  start_node 0 --head --port="$PORT" --dashboard-host=127.0.0.1 --dashboard-port="$dash" \
    --ray-client-server-port="$client"
  wait_started 0
  for ((i = 1; i < nodes; i++)); do
    start_node "$i" --address="127.0.0.1:$PORT"
  done
  for ((i = 1; i < nodes; i++)); do wait_started "$i"; done

  local head_agent=$(node_ports 0 | cut -d' ' -f4)
  "$PY" - "$dash" "$head_agent" "$nodes" <<'EOF' || { down >/dev/null 2>&1 || true; exit 1; }
import sys, time, urllib.error, urllib.request
from ray.util.state import list_nodes
dash, agent, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.time() + 120
def answers(url):
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        pass  # it answers (401 without the token): up
    except OSError:
        return False
    return True
# the dashboard and the head's agent (which runs submitted jobs) answer, and every node is alive
while not (answers(f"http://127.0.0.1:{dash}/api/version")
           and answers(f"http://127.0.0.1:{agent}/api/local_raylet_healthz")):
    if time.time() > deadline:
        sys.exit("local.sh: the dashboard or the head's agent did not come up")
    time.sleep(1)
while True:
    alive = list_nodes(address=f"http://127.0.0.1:{dash}", filters=[("state", "=", "ALIVE")])
    if len(alive) == want:
        if any(n.node_ip != "127.0.0.1" for n in alive):  # every port on loopback: see start_node
            sys.exit(f"local.sh: nodes on {sorted({n.node_ip for n in alive})}, not only 127.0.0.1")
        break
    if time.time() > deadline:
        sys.exit(f"local.sh: {len(alive)} of {want} nodes alive after 120 s")
    time.sleep(1)
EOF

  {
    echo "RAY_ADDRESS=http://127.0.0.1:$dash"
    echo "RAY_AUTH_MODE=token"
    echo "RAY_RESNET_LOCAL_GCS=127.0.0.1:$PORT"
    echo "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"   # what a client of the GCS needs (see the nodes' env)
    echo "RAY_RESNET_LOCAL_METRICS=$(for ((i = 0; i < nodes; i++)); do echo -n "http://127.0.0.1:$(node_ports "$i" | cut -d' ' -f3)/metrics "; done)"
  } >"$STATE/env"
  echo "local Ray cluster: head + $WORKERS worker node(s), $CPUS CPUs each; state in $STATE"
  echo "  RAY_ADDRESS=http://127.0.0.1:$dash   (dashboard; token auth: RAY_AUTH_MODE=token, token in ~/.ray/auth_token)"
  echo "  GCS 127.0.0.1:$PORT; metrics: $(sed -n 's/^RAY_RESNET_LOCAL_METRICS=//p' "$STATE/env")"
  echo "  Prometheus: prometheus --config.file=$STATE/n0/session_latest/metrics/prometheus/prometheus.yml --web.listen-address=127.0.0.1:9090"
  echo "  Grafana:    GF_SERVER_HTTP_ADDR=127.0.0.1 grafana-server --config $STATE/n0/session_latest/metrics/grafana/grafana.ini web"
  echo "submit (from the checkout):"
  echo "  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$dash --runtime-env $STATE/runtime_env.yaml \\"
  echo "    -- python -m pipelines.train --config ray_config.yaml scaling.placement_strategy=SPREAD"
  echo "stop:"
  echo "  cluster/local.sh down --state $STATE"
}

status() {
  [ -f "$STATE/env" ] || { echo "local.sh: no cluster in $STATE" >&2; exit 1; }
  local addr=$(sed -n 's/^RAY_ADDRESS=//p' "$STATE/env")
  RAY_AUTH_MODE=token "$PY" - "$addr" <<'EOF'
import sys
from ray.util.state import list_nodes
nodes = list_nodes(address=sys.argv[1])
for n in sorted(nodes, key=lambda n: not n.is_head_node):
    cpus = n.resources_total.get("CPU", 0)
    print(f"{n.node_id[:12]}  {n.state:5}  {'head  ' if n.is_head_node else 'worker'}  {cpus:g} CPUs  "
          f"{n.labels.get('ray-resnet-node', '')}")
print(f"{sum(n.state == 'ALIVE' for n in nodes)} node(s) alive")
EOF
}

down() {
  local f pid i
  # workers first, then the head: each `ray start --block` shuts its own processes down on SIGTERM
  for f in $(ls -r "$STATE"/node-*.pid 2>/dev/null); do
    pid=$(cat "$f")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$f"
  done
  # Ray's workers start in sessions of their own; anything still running from this cluster's temp
  # dirs (only this cluster's processes name them on their command line) goes too.
  [ -d "$STATE" ] && LOCAL_RAY_STATE=$STATE "$PY" - <<'EOF'
import os, signal, time
prefix, me = os.environ["LOCAL_RAY_STATE"].rstrip("/") + "/", {os.getpid(), os.getppid()}
def ours():
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if int(pid) not in me and any(prefix in a for a in args):
            pids.append(int(pid))
    return pids
for sig in [signal.SIGTERM] * 5 + [signal.SIGKILL]:
    pids = ours()
    if not pids:
        break
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    time.sleep(1)
EOF
  rm -f "$STATE/env"
  echo "local Ray cluster in $STATE stopped"
}

case "$cmd" in
  up) up ;;
  status) status ;;
  down) down ;;
  *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; echo "(cluster/local.sh --help: the whole story)" >&2; exit 2 ;;
esac
