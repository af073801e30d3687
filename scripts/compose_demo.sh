#!/usr/bin/env bash
# The demo's pipeline under docker compose, with an end: build the image, bring the services up, wait for
# `report`, print every stage's exit code, and exit non-zero when any stage failed. The teacher service and its
# balancer stay up for more students (`docker compose down` stops them). Results: runs/compose/ (RESULTS.md, pictures).
#
#   scripts/compose_demo.sh                           # the full plan
#   AKD_DEMO_QUICK=1 scripts/compose_demo.sh          # the quick plan
#   AKD_TEACHER_REPLICAS=2 scripts/compose_demo.sh    # two teacher replicas behind the balancer
#
# Read from the environment: TORCH (the image's torch; see the Dockerfile), AKD_IMAGE (default akd:latest),
# AKD_TEACHER_REPLICAS (default 1), AKD_NGINX_IMAGE (the balancer's, default nginx:1.28),
# AKD_HOST_PORT (the balancer's port on this host, default 8000), COMPOSE_PROJECT_NAME (default akd),
# AKD_UID and AKD_GID (the containers' user; default the user running this, below).
# Works with compose v2 (`docker compose`) and v1 (`docker-compose`, what Debian ships).
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-akd} AKD_IMAGE=${AKD_IMAGE:-akd:latest}
REPLICAS=${AKD_TEACHER_REPLICAS:-1}
STAGES=(teachers teacher balancer trainer-seed0 trainer-seed1 report)
LONG_LIVED=" teacher balancer "

compose() {
  if docker compose version >/dev/null 2>&1; then docker compose "$@"; else docker-compose "$@"; fi
}

# A service's containers (replicas), running or exited, by compose's own labels (v1 and v2 alike).
containers() {
  docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
    --filter "label=com.docker.compose.service=$1"
}

started=$SECONDS
docker build --network host ${TORCH:+--build-arg "TORCH=$TORCH"} -t "$AKD_IMAGE" .
# The containers run as the user running this (under sudo, the one who ran sudo), never as root: what they write in
# runs/compose is that user's on the host. Root itself gets the image's user, akd (1000), and gives it runs/compose.
if [ -z "${AKD_UID:-}" ]; then
  AKD_UID=${SUDO_UID:-$(id -u)} AKD_GID=${SUDO_GID:-$(id -g)}
  if [ "$AKD_UID" = 0 ]; then AKD_UID=1000 AKD_GID=1000; fi
fi
export AKD_UID AKD_GID=${AKD_GID:-$AKD_UID}
# Made by this user, not by the engine as root.
mkdir -p runs/compose
if [ "$(id -u)" = 0 ]; then
  chown -R "$AKD_UID:$AKD_GID" runs/compose
elif [ -n "$(find runs/compose ! -user "$AKD_UID" -print -quit)" ]; then
  echo "runs/compose holds files that are not uid $AKD_UID's (an older image ran its containers as root): take them once with sudo chown -R $AKD_UID:$AKD_GID runs/compose" >&2
  exit 1
fi
# One-shot stages left from an earlier run would report that run's exit codes for a stage this run never reaches.
compose rm -f -s teachers trainer-seed0 trainer-seed1 report >/dev/null 2>&1 || true
# `up -d` starts each stage once its dependencies are done (or healthy); a failed stage stops it early.
compose up -d --no-build --scale "teacher=$REPLICAS" || echo "compose up stopped early: a stage failed (exit codes below)"
report=$(containers report | head -n 1)
if [ -n "$report" ]; then docker wait "$report" >/dev/null; fi

failed=0
for stage in "${STAGES[@]}"; do
  ids=$(containers "$stage")
  if [ -z "$ids" ]; then
    echo "$stage: never started"; failed=1; continue
  fi
  for id in $ids; do
    state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id")
    if [[ "$LONG_LIVED" == *" $stage "* ]]; then
      echo "$stage: $state (long-lived)"
      [ "${state%% *}" = running ] || { failed=1; docker logs --tail 20 "$id"; }
    else
      echo "$stage: ${state}"
      [ "$state" = "exited 0" ] || { failed=1; docker logs --tail 20 "$id"; }
    fi
  done
done
echo "pipeline took $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
if [ "$failed" != 0 ]; then
  echo "FAILED: a stage did not finish (its log's end is above; all: docker logs <container>)" >&2
  exit 1
fi
echo "results: runs/compose/RESULTS.md; the teacher service ($REPLICAS replica(s) behind the balancer) still answers on port ${AKD_HOST_PORT:-8000} (stop: docker compose down)"
