#!/usr/bin/env bash
# End-to-end test of docker-compose.yml on this machine: install what is missing, build, start the cpu profile,
# fill the model volume, send jobs through Flower's REST API and `gpufleet submit` in a container (and a raw
# pickle message, which must come back as a contract error), check the results, tear everything down.
#
#   scripts/compose_smoke.sh [--local-base] [--base-image IMAGE] [--redis-image IMAGE] [--no-install] [--keep]
#
#   --local-base         build the base image from Debian's packages (scripts/local_base_image.sh, with the CPU
#                        torch where this machine's pip finds one) and use it for gpufleet's image and for Redis:
#                        for machines that cannot pull from the public image registry
#   --base-image IMAGE   the BASE_IMAGE build argument (default python:3.12-slim, the official image)
#   --redis-image IMAGE  the Redis image (default redis:7.4-bookworm)
#   --no-install         do not install Docker or Compose (fail if missing)
#   --keep               leave the stack running (then: docker compose -p gpufleet-smoke ... down -v)
#
# Installs, on Debian or Ubuntu, as root or through sudo: the Docker engine from the distribution (docker.io),
# Compose v2 (Debian 13+: docker-compose; Ubuntu: docker-compose-v2; Debian 12 packages only Compose v1, so
# there the Compose v2 plugin is taken from Debian 13's docker-compose package, unpacked into
# /usr/local/lib/docker/cli-plugins), curl and python3. Starts dockerd when none runs (through systemd when it
# is there, else in the background, stopped again at the end).
#
# Every connection stays on 127.0.0.1: the stack runs on the host's network (docker/compose.smoke.yml) with
# Redis, Flower and the API on SMOKE_REDIS_PORT (16379), SMOKE_FLOWER_PORT (15555) and SMOKE_API_PORT (18000).
# The project is `gpufleet-smoke` with its own volumes and the image gpufleet:smoke, so a real deployment from
# the same checkout is left alone; secrets are random, in a temporary env file (never .env).
# Exit status 0 when every check passed; the failing step and the services' logs otherwise.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "compose_smoke: $*" >&2; exit 1; }
step() { printf 'compose_smoke: [%4ss] %s\n' "$((SECONDS - started_s))" "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

local_base=0 install=1 keep=0
base_image=${BASE_IMAGE:-} redis_image=${REDIS_IMAGE:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --local-base) local_base=1 ;;
    --base-image) [ $# -ge 2 ] || die "--base-image needs an image"; base_image=$2; shift ;;
    --redis-image) [ $# -ge 2 ] || die "--redis-image needs an image"; redis_image=$2; shift ;;
    --no-install) install=0 ;;
    --keep) keep=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

started_s=$SECONDS
export SMOKE_REDIS_PORT=${SMOKE_REDIS_PORT:-16379} SMOKE_FLOWER_PORT=${SMOKE_FLOWER_PORT:-15555}
export SMOKE_API_PORT=${SMOKE_API_PORT:-18000}
EMBED=sentence-transformers/all-MiniLM-L6-v2
CHAT=gpufleet/tiny-chat
work=$(mktemp -d)
dockerd_pid=""

# --- install ---------------------------------------------------------------------------------------------------

apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

have_compose_v2() { docker compose version >/dev/null 2>&1; }

# Debian 12's docker-compose is Compose v1; Debian 13's is v2, a static binary needing only libc. Fetch that one
# package with a private apt state (the machine's sources and lists stay as they are) and unpack its plugin.
compose_v2_from_debian13() {
  local state="$work/apt" mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/deb"
  echo "deb $mirror trixie main" >"$state/sources.list"
  local opts=(-o "Dir::Etc::sourcelist=$state/sources.list" -o Dir::Etc::sourceparts=/nonexistent
    -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache" -o APT::Sandbox::User=root)
  as_root apt-get "${opts[@]}" update -qq
  (cd "$state/deb" && as_root apt-get "${opts[@]}" download -qq docker-compose/trixie)
  as_root dpkg-deb -x "$state"/deb/docker-compose_*.deb "$state/root"
  as_root install -D -m 0755 "$state/root/usr/libexec/docker/cli-plugins/docker-compose" \
    /usr/local/lib/docker/cli-plugins/docker-compose
}

install_missing() {
  local packages=()
  command -v dockerd >/dev/null 2>&1 || packages+=(docker.io)
  command -v curl >/dev/null 2>&1 || packages+=(curl ca-certificates)
  command -v python3 >/dev/null 2>&1 || packages+=(python3)
  if [ ${#packages[@]} -gt 0 ]; then
    step "installing ${packages[*]}"
    as_root apt-get update -qq
    apt_install "${packages[@]}"
  fi
  have_compose_v2 && return 0
  step "installing Compose v2"
  apt_install docker-compose-v2 2>/dev/null || true  # Ubuntu's name
  have_compose_v2 && return 0
  if apt-cache show docker-compose 2>/dev/null | grep -q '^Version: 2\.'; then
    apt_install docker-compose  # Debian 13 and later: Compose v2
  else
    compose_v2_from_debian13
  fi
  have_compose_v2 || die "Compose v2 is still missing after the install: install the docker compose plugin"
}

start_engine() {
  docker info >/dev/null 2>&1 && return 0
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    step "starting docker.service"
    as_root systemctl start docker || true
  fi
  if ! docker info >/dev/null 2>&1; then
    # No systemd (a container, a CI sandbox): run dockerd for this test only. Host networking needs no bridge
    # and no iptables rules, so none are set up.
    step "starting dockerd in the background (log: $work/dockerd.log)"
    # shellcheck disable=SC2016  # $1 and $2 expand in the inner shell, as intended
    as_root sh -c 'dockerd --bridge=none --iptables=false --ip6tables=false >"$1" 2>&1 & echo $! >"$2"' \
      sh "$work/dockerd.log" "$work/dockerd.pid"
    dockerd_pid=$(cat "$work/dockerd.pid")
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  fi
  docker info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2 2>/dev/null || true; die "no Docker engine answers"; }
}

# --- the stack -------------------------------------------------------------------------------------------------

compose() {
  docker compose -p gpufleet-smoke --project-directory "$REPO" --env-file "$work/smoke.env" \
    -f "$REPO/docker-compose.yml" -f "$REPO/docker/compose.smoke.yml" --profile cpu --profile setup "$@"
}

teardown() {
  local status=$?
  set +e
  if [ "$status" != 0 ] && [ -f "$work/smoke.env" ]; then
    echo "compose_smoke: FAILED; the services' logs follow" >&2
    compose logs --no-color --tail=60 >&2 2>/dev/null
  fi
  if [ "$keep" = 1 ] && [ "$status" = 0 ]; then
    echo "compose_smoke: left running; env file $work/smoke.env" >&2
  else
    [ -f "$work/smoke.env" ] && compose down -v --remove-orphans --timeout 20 >/dev/null 2>&1
    if [ -n "$dockerd_pid" ]; then
      as_root kill "$dockerd_pid" 2>/dev/null
      for _ in $(seq 20); do as_root kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
    fi
    rm -rf "$work"
  fi
  echo "compose_smoke: $([ "$status" = 0 ] && echo passed || echo failed) in $((SECONDS - started_s)) s" >&2
  exit "$status"
}
trap teardown EXIT

# json_get FILE EXPR: evaluate a Python expression over the JSON document `d` in FILE and print it.
json_get() { python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }

# check NAME FILE EXPR: fail with the document unless the expression over `d` is true.
check() {
  if [ "$(json_get "$2" "bool($3)")" != True ]; then
    echo "compose_smoke: check failed: $1 ($3) on:" >&2
    cat "$2" >&2
    exit 1
  fi
  step "ok: $1"
}

flower_api() {  # METHOD PATH [JSON BODY]
  curl -sS --fail-with-body --max-time 150 -u "admin:$flower_password" -X "$1" \
    -H 'Content-Type: application/json' ${3:+-d "$3"} "http://127.0.0.1:$SMOKE_FLOWER_PORT$2"
}

# flower_result TASK_ID SECONDS: wait for the job, then read it again: Flower's answer to a waiting request carries
# the state it saw before the wait (PENDING, PROGRESS), next to the final result.
flower_result() {
  flower_api GET "/api/task/result/$1?timeout=$2" >/dev/null
  flower_api GET "/api/task/result/$1"
}

if [ "$install" = 1 ]; then
  install_missing
else
  have_compose_v2 || die "no Compose v2 (\`docker compose\`); run without --no-install to install it"
fi
start_engine

if [ "$local_base" = 1 ]; then
  step "building the base image from Debian's packages"
  GPUFLEET_TORCH=${GPUFLEET_TORCH:-torch==2.13.0} bash "$REPO/scripts/local_base_image.sh" gpufleet-base:local
  base_image=${base_image:-gpufleet-base:local}
  redis_image=${redis_image:-gpufleet-base:local}
fi

flower_password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
api_token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
cat >"$work/smoke.env" <<EOF
REDIS_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
FLOWER_USER=admin
FLOWER_PASSWORD=$flower_password
API_TOKEN=$api_token
GPUFLEET_IMAGE=gpufleet:smoke
BASE_IMAGE=${base_image:-python:3.12-slim}
REDIS_IMAGE=${redis_image:-redis:7.4-bookworm}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
EOF

step "building gpufleet:smoke (BASE_IMAGE=${base_image:-python:3.12-slim})"
compose build worker-cpu
step "filling the model volume (models make-demo)"
compose run --rm models
step "starting redis, flower, api and worker-cpu"
compose up -d --no-build --wait redis flower api
compose up -d --no-build worker-cpu

step "waiting for the CPU worker to report ready"
for _ in $(seq 150); do
  curl -sS --max-time 5 "http://127.0.0.1:$SMOKE_API_PORT/healthz" >"$work/healthz.json" 2>/dev/null || true
  [ -s "$work/healthz.json" ] && [ "$(json_get "$work/healthz.json" 'd.get("ready", 0)')" -ge 1 ] && break
  compose ps --status exited --services 2>/dev/null | grep -qx worker-cpu && die "worker-cpu exited"
  sleep 2
done
check "the API sees one ready worker" "$work/healthz.json" 'd["ready"] >= 1'

curl -sS --max-time 10 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$SMOKE_API_PORT/workers" >"$work/code"
[ "$(cat "$work/code")" = 401 ] || die "the API's /workers answered $(cat "$work/code") without its token"
step "ok: the API refuses /workers without the token"
curl -sS --fail --max-time 10 -H "Authorization: Bearer $api_token" "http://127.0.0.1:$SMOKE_API_PORT/workers" \
  >"$work/workers.json"
check "the API lists the CPU worker" "$work/workers.json" \
  'any(w["name"].startswith("cpu-") for w in (d["workers"] if isinstance(d, dict) else d))'

code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$SMOKE_FLOWER_PORT/api/task/send-task/fleet.embed")
[ "$code" = 401 ] || die "Flower answered $code to a send-task without credentials"
step "ok: Flower refuses a send-task without credentials"

# The README's example, as written: no queue, so the router picks the live CPU worker.
flower_api POST /api/task/send-task/fleet.embed \
  "{\"kwargs\": {\"model\": \"$EMBED\", \"texts\": [\"A man is eating food.\"]}}" >"$work/sent.json"
task_id=$(json_get "$work/sent.json" 'd["task-id"]')
flower_result "$task_id" 120 >"$work/result.json"
check "Flower's send-task without a queue is answered by the CPU worker" "$work/result.json" \
  'd["state"] == "SUCCESS" and d["result"]["dim"] == 384 and d["result"]["gpu_type"] == "cpu"'

# An explicit queue goes at the top level of the body (Flower 2.x ignores one inside "options").
flower_api POST /api/task/send-task/fleet.generate \
  "{\"kwargs\": {\"model\": \"$CHAT\", \"prompt\": \"The fleet\", \"max_new_tokens\": 4}, \"queue\": \"cpu\"}" \
  >"$work/sent.json"
flower_result "$(json_get "$work/sent.json" 'd["task-id"]')" 120 >"$work/result.json"
check "Flower's send-task with a top-level queue" "$work/result.json" \
  'd["state"] == "SUCCESS" and 1 <= d["result"]["completion_tokens"] <= 4'

# A bad request comes back as a contract error, not silence.
flower_api POST /api/task/send-task/fleet.unload_model '{"kwargs": {"model": "../x"}, "queue": "cpu"}' \
  >"$work/sent.json"
flower_result "$(json_get "$work/sent.json" 'd["task-id"]')" 60 >"$work/result.json"
check "a malformed model id is refused with InvalidRequestError" "$work/result.json" \
  'd["state"] == "FAILURE" and "InvalidRequestError" in str(d["result"])'

# `gpufleet submit` inside a container: a producer on the compose network (here the host's) with the model volume.
compose exec -T worker-cpu gpufleet submit embed "$EMBED" "A man is eating food." "Stocks fell." --json \
  --timeout 120 >"$work/submit.json"
check "gpufleet submit embed in a container" "$work/submit.json" \
  'd["dim"] == 384 and len(d["embeddings"]) == 2 and d["gpu_type"] == "cpu"'
compose exec -T worker-cpu gpufleet submit generate "$CHAT" --message "user:Hello" --max-new-tokens 4 --json \
  --timeout 120 >"$work/submit.json"
check "gpufleet submit generate in a container" "$work/submit.json" '1 <= d["completion_tokens"] <= 4'

# The OpenAI-compatible endpoints of the api service, the token as the key: one embedding, one streamed chat.
v1() {  # PATH JSON-BODY
  curl -sS --fail --max-time 120 -H "Authorization: Bearer $api_token" -H 'Content-Type: application/json' \
    "http://127.0.0.1:$SMOKE_API_PORT/v1/$1" -d "$2"
}
v1 embeddings "{\"model\": \"$EMBED\", \"input\": \"A man is eating food.\", \"encoding_format\": \"float\"}" \
  >"$work/v1-embed.json"
check "POST /v1/embeddings through the api service" "$work/v1-embed.json" \
  'len(d["data"][0]["embedding"]) == 384 and d["usage"]["prompt_tokens"] > 0'
v1 chat/completions "{\"model\": \"$CHAT\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 4, \"stream\": true}" \
  >"$work/v1-chat.txt"
tail -n 2 "$work/v1-chat.txt" | grep -qx 'data: \[DONE\]' || { cat "$work/v1-chat.txt" >&2; die "the streamed chat did not end with [DONE]"; }
step "ok: /v1/embeddings and a streamed /v1/chat/completions answer through the api service"

# A pickle message, published raw to the worker's queue: refused with a contract error, never unpickled.
compose exec -T worker-cpu python - >"$work/pickle.txt" <<'PY'
import pickle
import uuid

from gpufleet.tasks.app import create_app
from gpufleet.tasks.errors import InvalidRequestError

app = create_app()
task_id = str(uuid.uuid4())
with app.producer_or_acquire() as producer:
    producer.publish(
        pickle.dumps(((), {"model": "x"}, {})), exchange="", routing_key="cpu", retry=True,
        content_type="application/x-python-serialize", content_encoding="binary",
        headers={"lang": "py", "task": "fleet.embed", "id": task_id, "root_id": task_id},
    )
try:
    app.AsyncResult(task_id).get(timeout=30)
except InvalidRequestError as exc:
    print(exc)
else:
    raise SystemExit("the pickle message was not refused")
PY
grep -q "is refused; gpufleet accepts JSON only" "$work/pickle.txt" || { cat "$work/pickle.txt" >&2; die "pickle check"; }
step "ok: a pickle message is answered with InvalidRequestError"

step "all checks passed"
