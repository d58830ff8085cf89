#!/usr/bin/env bash
# A local multi-node Ray cluster for tests and benchmarks: one head and N workers, each in its own
# Linux network namespace (root only), all on one private /24 with no route anywhere else.
#
#   cluster/local.sh up [N]     head + N workers (default 1); prints the dashboard and how to submit
#   cluster/local.sh down       kill every process of the cluster's namespaces (by PID), delete them
#   cluster/local.sh status     namespaces, PIDs, Ray nodes
#   cluster/local.sh env        the cluster's settings as shell assignments (after `up`)
#
# Network: the head namespace holds a bridge (br0, 10.77.0.1/24); worker k's veth pair joins its
# namespace (eth0, 10.77.0.(k+1)) to that bridge. Nothing is added to the root namespace, so the
# nodes reach each other and nothing else; use `ip netns exec <head ns> ...` to talk to the cluster.
#
# Ray: `ray start` from the repository's venv, one CPU per node (S3C_HEAD_CPUS, S3C_WORKER_CPUS),
# token auth (RAY_AUTH_MODE=token, a token generated for this cluster in $STATE/auth_token), its own
# temp dir per node under $STATE (short: Unix sockets), OMP_NUM_THREADS=1, the venv's bin first on
# PATH (a job's `python`), and the repository as working directory.
# Ports are Ray's defaults: every node has its own network namespace, hence its own ports.
# Ray settings such as RAY_health_check_period_ms in the caller's environment reach every node.
#
# Settings (environment): S3C_NAME (default s3c; namespaces <name>-head, <name>-w1.., at most 10
# characters), S3C_SUBNET (default 10.77.0), S3C_HEAD_CPUS (1), S3C_WORKER_CPUS (1), S3C_PORT (6379),
# S3C_DASHBOARD_PORT (8265), S3C_STATE (default /tmp/s3c-<name>: token, PID lists, logs, temp dirs),
# S3C_VENV (default <repo>/.venv), S3C_TIMEOUT (seconds to wait for the nodes, default 90).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="${S3C_NAME:-s3c}"
SUBNET="${S3C_SUBNET:-10.77.0}"
HEAD_CPUS="${S3C_HEAD_CPUS:-1}"
WORKER_CPUS="${S3C_WORKER_CPUS:-1}"
PORT="${S3C_PORT:-6379}"
DASH_PORT="${S3C_DASHBOARD_PORT:-8265}"
STATE="${S3C_STATE:-/tmp/s3c-$NAME}"
VENV="${S3C_VENV:-$ROOT/.venv}"
TIMEOUT="${S3C_TIMEOUT:-90}"
HEAD_NS="$NAME-head"
HEAD_IP="$SUBNET.1"
DASHBOARD="http://$HEAD_IP:$DASH_PORT"

die() { echo "local.sh: $*" >&2; exit 1; }
log() { echo "local.sh: $*" >&2; }

[[ "$NAME" =~ ^[a-z0-9][a-z0-9-]{0,9}$ ]] || die "S3C_NAME must be 1-10 of [a-z0-9-], got '$NAME'"
[[ "$SUBNET" =~ ^10\.[0-9]+\.[0-9]+$ ]] || die "S3C_SUBNET must be a private 10.x.y prefix, got '$SUBNET'"

need_root() {
  [[ $EUID -eq 0 ]] || die "must run as root (network namespaces)"
  ip netns list >/dev/null 2>&1 || die "'ip netns' is unavailable"
}

ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

# The cluster's namespaces: the head and every <name>-w<k> that exists (or was recorded).
cluster_namespaces() {
  {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NAME-(head|w[0-9]+)\$" || true
    if [[ -f "$STATE/namespaces" ]]; then cat "$STATE/namespaces"; fi
  } | sort -u
}

# Environment of every Ray node: explicit, so nothing of the caller's local-Ray settings leaks in.
node_env() {  # $1 = node temp dir; sets NODE_ENV
  NODE_ENV=(env -u RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER -u RAY_ADDRESS -u RAY_AUTH_TOKEN
    "PATH=$VENV/bin:$PATH" "RAY_TMPDIR=$1" RAY_AUTH_MODE=token "RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
    RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1)
}

record_pids() {  # $1 = namespace
  ip netns pids "$1" >"$STATE/$1.pids" 2>/dev/null || true
}

# Ray nodes alive, as seen by the dashboard (state API, with the cluster's token).
alive_nodes() {
  ip netns exec "$HEAD_NS" curl -sf --max-time 5 -H "Authorization: Bearer $(cat "$STATE/auth_token")" \
    "$DASHBOARD/api/v0/nodes?limit=1000&detail=false" 2>/dev/null |
    "$VENV/bin/python" -c 'import json,sys; d=json.load(sys.stdin); print(sum(n["state"]=="ALIVE" for n in d["data"]["result"]["result"]))' \
    2>/dev/null || echo 0
}

cmd_up() {
  local n="${1:-1}"
  [[ "$n" =~ ^[0-9]+$ ]] && (( n <= 200 )) || die "N must be 0..200 workers, got '$n'"
  need_root
  [[ -x "$VENV/bin/ray" ]] || die "no Ray in $VENV (run 'make setup')"
  local existing
  existing="$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NAME-(head|w[0-9]+)\$" | tr '\n' ' ' || true)"
  [[ -z "$existing" ]] || die "cluster '$NAME' is (partly) up: namespaces $existing; run 'S3C_NAME=$NAME $0 down' first"
  trap 'log "up failed; clean up with: S3C_NAME=$NAME $0 down"' ERR
  local t0=$SECONDS
  cd "$ROOT"  # the nodes' working directory: a job without --working-dir starts here (runs/ = <repo>/runs)
  rm -rf "$STATE"
  mkdir -p "$STATE"
  chmod 700 "$STATE"
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/auth_token")
  : >"$STATE/namespaces"

  # network: the bridge lives in the head namespace
  ip netns add "$HEAD_NS"
  echo "$HEAD_NS" >>"$STATE/namespaces"
  ip -n "$HEAD_NS" link set lo up
  ip -n "$HEAD_NS" link add br0 type bridge
  ip -n "$HEAD_NS" addr add "$HEAD_IP/24" dev br0
  ip -n "$HEAD_NS" link set br0 up
  local k ns
  for ((k = 1; k <= n; k++)); do
    ns="$NAME-w$k"
    ip netns add "$ns"
    echo "$ns" >>"$STATE/namespaces"
    ip -n "$ns" link set lo up
    ip -n "$HEAD_NS" link add "vw$k" type veth peer name eth0 netns "$ns"
    ip -n "$HEAD_NS" link set "vw$k" master br0
    ip -n "$HEAD_NS" link set "vw$k" up
    ip -n "$ns" addr add "$SUBNET.$((k + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
  done

  # head
  mkdir -p "$STATE/h"
  node_env "$STATE/h"
  if ! ip netns exec "$HEAD_NS" "${NODE_ENV[@]}" "$VENV/bin/ray" start --head \
      --node-ip-address="$HEAD_IP" --port="$PORT" --num-cpus="$HEAD_CPUS" --num-gpus=0 \
      --include-dashboard=true --dashboard-host="$HEAD_IP" --dashboard-port="$DASH_PORT" \
      --disable-usage-stats >"$STATE/$HEAD_NS.log" 2>&1; then
    record_pids "$HEAD_NS"
    cat "$STATE/$HEAD_NS.log" >&2
    die "the head did not start (log: $STATE/$HEAD_NS.log); run '$0 down' to clean up"
  fi
  record_pids "$HEAD_NS"

  # workers, started in parallel
  local pids=()
  for ((k = 1; k <= n; k++)); do
    ns="$NAME-w$k"
    mkdir -p "$STATE/w$k"
    node_env "$STATE/w$k"
    # --temp-dir: without it a worker node takes the head's temp dir (from the GCS), i.e. the head's
    # session directory and socket names, which races when nodes share a filesystem
    ip netns exec "$ns" "${NODE_ENV[@]}" "$VENV/bin/ray" start --address="$HEAD_IP:$PORT" \
      --node-ip-address="$SUBNET.$((k + 1))" --num-cpus="$WORKER_CPUS" --num-gpus=0 --temp-dir="$STATE/w$k/ray" \
      --disable-usage-stats >"$STATE/$ns.log" 2>&1 &
    pids+=($!)
  done
  local failed=0
  for k in "${!pids[@]}"; do
    if ! wait "${pids[$k]}"; then
      failed=1
      cat "$STATE/$NAME-w$((k + 1)).log" >&2
    fi
  done
  for ((k = 1; k <= n; k++)); do record_pids "$NAME-w$k"; done
  ((failed == 0)) || die "a worker did not start (logs in $STATE); run '$0 down' to clean up"

  # wait until the dashboard sees every node alive
  local want=$((n + 1)) got=0 deadline=$((SECONDS + TIMEOUT))
  while ((SECONDS < deadline)); do
    got=$(alive_nodes)
    ((got >= want)) && break
    sleep 0.5
  done
  ((got >= want)) || die "only $got of $want Ray nodes alive after ${TIMEOUT}s (logs in $STATE)"
  for ns in $(cluster_namespaces); do record_pids "$ns"; done

  cat >"$STATE/cluster.env" <<EOF
S3C_NAME=$NAME
S3C_HEAD_NS=$HEAD_NS
S3C_WORKER_NS="$(for ((k = 1; k <= n; k++)); do printf '%s ' "$NAME-w$k"; done | sed 's/ $//')"
S3C_HEAD_IP=$HEAD_IP
S3C_GCS_ADDRESS=$HEAD_IP:$PORT
S3C_DASHBOARD=$DASHBOARD
S3C_TOKEN_PATH=$STATE/auth_token
S3C_STATE=$STATE
S3C_VENV=$VENV
EOF
  cat <<EOF
cluster '$NAME' up in $((SECONDS - t0)) s: head $HEAD_IP (namespace $HEAD_NS, $HEAD_CPUS CPU) + $n worker(s) ($WORKER_CPUS CPU each)
dashboard: $DASHBOARD  (reachable from the cluster's namespaces: ip netns exec $HEAD_NS ...)
token auth: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token
submit a search (the storage path must be shared by every node: any absolute path here is):
  ip netns exec $HEAD_NS env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token \\
    $VENV/bin/s3 submit --address $DASHBOARD --space $ROOT/search_spaces/smoke.yaml --runs $ROOT/runs
  (plain Ray works too: ... $VENV/bin/ray job list --address $DASHBOARD)
stop: $0 down   (with S3C_NAME=$NAME)
EOF
}

# Kill every process in a namespace (the PIDs it holds now, plus recorded ones still inside it).
kill_namespace() {  # $1 = namespace
  local ns="$1" sig pids p i
  ns_exists "$ns" || return 0
  for sig in TERM KILL; do
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    if [[ -f "$STATE/$ns.pids" ]]; then
      for p in $(cat "$STATE/$ns.pids"); do
        [[ "$(ip netns identify "$p" 2>/dev/null || true)" == "$ns" ]] && pids="$pids $p"
      done
    fi
    pids="$(echo $pids | tr ' ' '\n' | sort -u | tr '\n' ' ')"
    [[ -z "${pids// /}" ]] && return 0
    # shellcheck disable=SC2086
    kill -s "$sig" $pids 2>/dev/null || true
    # SIGTERM: give Ray up to 3 s to exit cleanly; SIGKILL: wait until the namespace is empty
    local polls=100
    [[ $sig == TERM ]] && polls=30
    for ((i = 0; i < polls; i++)); do
      [[ -z "$(ip netns pids "$ns" 2>/dev/null)" ]] && return 0
      sleep 0.1
    done
  done
  [[ -z "$(ip netns pids "$ns" 2>/dev/null)" ]] || log "processes left in $ns: $(ip netns pids "$ns" | tr '\n' ' ')"
}

cmd_down() {
  need_root
  local ns nss
  nss="$(cluster_namespaces)"
  # workers first, then the head (its dashboard and agents outlive a SIGTERM to the raylet)
  for ns in $(echo "$nss" | grep -v -- "-head\$" || true) $(echo "$nss" | grep -- "-head\$" || true); do
    kill_namespace "$ns"
  done
  for ns in $nss; do
    if ns_exists "$ns"; then ip netns del "$ns" 2>/dev/null || log "could not delete namespace $ns"; fi
  done
  rm -rf "$STATE"
  echo "cluster '$NAME' down"
}

cmd_status() {
  local ns
  for ns in $(cluster_namespaces); do
    if ns_exists "$ns"; then
      echo "$ns: $(ip netns pids "$ns" 2>/dev/null | wc -l) processes"
    else
      echo "$ns: (gone)"
    fi
  done
  if ns_exists "$HEAD_NS" && [[ -f "$STATE/auth_token" ]]; then
    echo "Ray nodes alive: $(alive_nodes)"
  else
    echo "cluster '$NAME' is down"
  fi
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) [[ -f "$STATE/cluster.env" ]] || die "cluster '$NAME' is not up"; cat "$STATE/cluster.env" ;;
  *) echo "usage: $0 up [N] | down | status | env   (settings: see the head of this file)" >&2; exit 2 ;;
esac
