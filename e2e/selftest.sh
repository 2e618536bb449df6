#!/usr/bin/env bash
# e2e/selftest.sh: checks that the engine of e2e/engine.sh and its stand-in images do what the
# botfleet stack relies on. Needs `bash e2e/engine.sh up` first; leaves nothing behind (its
# containers, network, volumes and the test image are removed, the engine keeps running).
#
#   bash e2e/selftest.sh            # all checks, including a build of the project's Dockerfile
#   SKIP_PROJECT_BUILD=1 bash e2e/selftest.sh
#
# Passwords travel in files only (a secret file for the server, pgpass files for the clients):
# none is on a command line or in this script's output.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
eval "$(bash "$HERE/engine.sh" env)"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || { echo "engine not running: bash e2e/engine.sh up" >&2; exit 1; }

P=botfleet-e2e-selftest            # prefix of everything this test creates
NET=$P-net PG=$P-pg VOL=$P-pgdata
T=$(mktemp -d /tmp/$P.XXXXXX)
passed=0 failed=0

cleanup() {
  docker rm -f "$PG" "$PG-2" >/dev/null 2>&1 || true
  docker compose -p "$P" -f "$T/compose.yaml" down -v >/dev/null 2>&1 || true
  docker volume rm "$VOL" >/dev/null 2>&1 || true
  docker network rm "$NET" >/dev/null 2>&1 || true
  docker image rm botfleet-bot:e2etest >/dev/null 2>&1 || true
  rm -rf "$T"
}
trap cleanup EXIT

logs() { docker logs "$1" >"$T/logs" 2>&1; cat "$T/logs"; }  # whole log first: `docker logs | grep -q` can
                                                          # die of SIGPIPE, which pipefail counts as failure
in_log() { docker logs "$1" >"$T/logs" 2>&1; grep -qF -- "$2" "$T/logs"; }
ok() { echo "ok   $*"; passed=$((passed + 1)); }
bad() { echo "FAIL $*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@" >"$T/out" 2>&1; then ok "$what"; else bad "$what"; sed 's/^/     /' "$T/out" | tail -n 15; fi; }

# ---- python stand-in ------------------------------------------------------------------------
check "python stand-in: python -c 'import ssl'" \
  docker run --rm python:3.12-slim-bookworm python -c 'import ssl; print(1)'
check "python stand-in: pip reaches PyPI through the CA store (pip download)" \
  docker run --rm --network host python:3.12-slim-bookworm \
    pip download -q --no-deps -d /tmp/x "packaging"
echo "     $(docker run --rm python:3.12-slim-bookworm python -c 'import sys; print("python", sys.version.split()[0])')"

# ---- postgres stand-in ----------------------------------------------------------------------
head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$T/pw"
chmod 600 "$T/pw"
printf '%s:5432:*:postgres:%s\n' "$PG" "$(cat "$T/pw")" >"$T/pgpass"
printf '%s:5432:*:postgres:%s\n' "$PG" "not-the-password" >"$T/pgpass-wrong"
printf '*:*:*:postgres:%s\n' "$(cat "$T/pw")" >"$T/pgpass-any"
chmod 600 "$T"/pgpass*
cat >"$T/postgresql.conf" <<'EOF'
# a custom config as the stack renders it: config_file= on the command line, data dir from PGDATA
listen_addresses = '*'
port = 5432
password_encryption = 'scram-sha-256'
cluster_name = 'botfleet-e2e-selftest'
EOF
mkdir -p "$T/initdb"
cat >"$T/initdb/10-marker.sql" <<'EOF'
CREATE TABLE e2e_init_marker (at timestamptz DEFAULT now());
INSERT INTO e2e_init_marker DEFAULT VALUES;
EOF
printf '#!/bin/sh\necho "init script ran as $(id -un)"\n' >"$T/initdb/20-whoami.sh"
chmod 0644 "$T/initdb/10-marker.sql" "$T/initdb/20-whoami.sh"

docker network create "$NET" >/dev/null
run_pg() {  # $1 = container name; the stack's command form and secret file
  docker run -d --name "$1" --network "$NET" --network-alias "$PG" \
    -p 127.0.0.1::5432 \
    -e POSTGRES_USER=postgres -e POSTGRES_PASSWORD_FILE=/run/secrets/postgres_password \
    -v "$T/pw:/run/secrets/postgres_password:ro" \
    -v "$T/postgresql.conf:/etc/postgresql/postgresql.conf:ro" \
    -v "$T/initdb:/docker-entrypoint-initdb.d:ro" \
    -v "$VOL:/var/lib/postgresql/data" \
    postgres:17 postgres -c config_file=/etc/postgresql/postgresql.conf >/dev/null
}
wait_ready() {  # pg_isready over TCP inside the container, as the stack's healthcheck does
  local deadline=$((SECONDS + 90))
  until docker exec "$1" pg_isready -q -h 127.0.0.1 -p 5432 -U postgres -d postgres; do
    [ "$SECONDS" -lt "$deadline" ] || { logs "$1" | tail -n 20; return 1; }
    sleep 1
  done
}
psql_from_client() {  # $1 = pgpass file, rest = psql arguments; a second container on the network
  local pass=$1; shift
  docker run --rm --network "$NET" -v "$pass:/pgpass:ro" -e PGPASSFILE=/pgpass \
    postgres:17 psql -h "$PG" -p 5432 -U postgres -d postgres -X -A -t -v ON_ERROR_STOP=1 "$@"
}

s=$SECONDS
run_pg "$PG"
check "postgres stand-in: pg_isready over TCP inside the container" wait_ready "$PG"
echo "     (first start with initdb: $((SECONDS - s)) s)"
inited() { in_log "$PG" 'initialisation complete' && in_log "$PG" 'init script ran as postgres'; }
check "postgres stand-in: initdb ran, init scripts ran as postgres" inited
scram_login() { [ "$(psql_from_client "$T/pgpass" -c 'SELECT system_user')" = 'scram-sha-256:postgres' ]; }
check "postgres stand-in: password login over TCP from another container (scram-sha-256)" scram_login
config_applies() {
  [ "$(psql_from_client "$T/pgpass" -c 'SHOW cluster_name')" = botfleet-e2e-selftest ] &&
  [ "$(psql_from_client "$T/pgpass" -c 'SHOW listen_addresses')" = '*' ]
}
check "postgres stand-in: the custom config_file applies (cluster_name, listen_addresses)" config_applies
scram_stored() { [ "$(psql_from_client "$T/pgpass" -c "SELECT rolpassword LIKE 'SCRAM-SHA-256\$%' FROM pg_authid WHERE rolname = 'postgres'")" = t ]; }
check "postgres stand-in: the stored password is a SCRAM verifier" scram_stored
wrong_refused() {
  if psql_from_client "$T/pgpass-wrong" -c 'SELECT 1' >"$T/wrong" 2>&1; then return 1; fi
  grep -q 'password authentication failed' "$T/wrong"
}
check "postgres stand-in: a wrong password is refused" wrong_refused
port=$(docker port "$PG" 5432/tcp | head -n1 | sed 's/.*://')
if command -v psql >/dev/null; then
  check "postgres stand-in: published on 127.0.0.1:$port, login from the host" \
    env PGPASSFILE="$T/pgpass-any" psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -X -A -t -c 'SELECT 1'
fi
no_pw_in_log() { ! in_log "$PG" "$(cat "$T/pw")"; }
check "postgres stand-in: the password is in no log line" no_pw_in_log
echo "     $(psql_from_client "$T/pgpass" -c 'SELECT version()' | cut -d, -f1)"

docker restart "$PG" >/dev/null
check "postgres stand-in: docker restart on the same volume" wait_ready "$PG"
docker rm -f "$PG" >/dev/null
run_pg "$PG-2"
check "postgres stand-in: a new container on the same volume" wait_ready "$PG-2"
no_second_init() {
  in_log "$PG-2" 'skipping initialisation' &&
  ! in_log "$PG-2" 'initialising' &&
  [ "$(psql_from_client "$T/pgpass" -c 'SELECT count(*) FROM e2e_init_marker')" = 1 ]
}
check "postgres stand-in: no second initdb (log says skipping; init script rows = 1)" no_second_init
fast_stop() { docker stop -t 30 "$PG-2" >/dev/null && in_log "$PG-2" 'fast shutdown request'; }
check "postgres stand-in: docker stop is a fast shutdown (SIGINT)" fast_stop
docker rm -f "$PG-2" >/dev/null
needs_password() {
  if docker run --rm postgres:17 >"$T/nopw" 2>&1; then return 1; fi
  grep -q 'no superuser password' "$T/nopw"
}
check "postgres stand-in: refuses to initialise without a password" needs_password
version_only() {
  [[ "$(docker run --rm postgres:17 -V)" == *PostgreSQL* ]] &&
  [[ "$(docker run --rm postgres:17 postgres --version)" == *PostgreSQL* ]]
}
check "postgres stand-in: '-V' and 'postgres --version' answer without initialising" version_only

# ---- compose v2 on this engine: configs, secrets, healthcheck as in the rendered stack -------
cat >"$T/compose.yaml" <<EOF
services:
  postgres:
    image: "postgres:17"
    command: ["postgres", "-c", "config_file=/etc/postgresql/postgresql.conf"]
    environment:
      POSTGRES_USER: "postgres"
      POSTGRES_PASSWORD_FILE: "/run/secrets/postgres_password"
    configs:
      - source: "postgresql_conf"
        target: "/etc/postgresql/postgresql.conf"
    secrets:
      - "postgres_password"
    volumes:
      - "pgdata:/var/lib/postgresql/data"
    healthcheck:
      test: ["CMD", "pg_isready", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", "postgres"]
      interval: "2s"
      timeout: "5s"
      retries: 30
    deploy:
      resources:
        limits:
          memory: "512M"
    networks: ["db"]
networks:
  db: {}
volumes:
  pgdata: {}
configs:
  postgresql_conf:
    file: "$T/postgresql.conf"
secrets:
  postgres_password:
    file: "$T/pw"
EOF
check "compose: docker compose up --wait (configs, secrets, healthcheck, memory limit)" \
  docker compose -p "$P" -f "$T/compose.yaml" up -d --wait --wait-timeout 120
mem_limit() { [ "$(docker inspect -f '{{.HostConfig.Memory}}' "$(docker compose -p "$P" -f "$T/compose.yaml" ps -q postgres)")" = 536870912 ]; }
check "compose: the memory limit is applied" mem_limit
check "compose: down -v" docker compose -p "$P" -f "$T/compose.yaml" down -v

# ---- the project's own Dockerfile on the python stand-in ------------------------------------
if [ "${SKIP_PROJECT_BUILD:-0}" != 1 ]; then
  s=$SECONDS
  check "project Dockerfile builds unchanged (DOCKER_BUILDKIT=0 docker build --network host)" \
    env DOCKER_BUILDKIT=0 docker build --network host -t botfleet-bot:e2etest "$REPO"
  echo "     ($((SECONDS - s)) s)"
  bot_image_runs() {
    docker run --rm botfleet-bot:e2etest provision --help >/dev/null &&
    [ "$(docker run --rm botfleet-bot:e2etest id -un)" = botfleet ]
  }
  check "project image: provision --help runs, as user botfleet" bot_image_runs
  echo "     data root with the project image: $(du -sh "$(docker info -f '{{.DockerRootDir}}')" | cut -f1)"
  docker image rm botfleet-bot:e2etest >/dev/null
  docker image prune -f >/dev/null
fi

echo "selftest: $passed passed, $failed failed"
[ "$failed" = 0 ]
