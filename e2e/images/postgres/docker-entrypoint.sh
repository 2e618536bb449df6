#!/usr/bin/env bash
# Entrypoint of the postgres STAND-IN image of botfleet's e2e harness (written for this harness;
# it is not the official image's script). What it honours:
#   POSTGRES_PASSWORD / POSTGRES_PASSWORD_FILE  superuser password (one of them is required to
#                          initialise, unless POSTGRES_HOST_AUTH_METHOD=trust); never printed
#   POSTGRES_USER          superuser name (default postgres)
#   POSTGRES_DB            database created on first start (default: $POSTGRES_USER)
#   POSTGRES_INITDB_ARGS   extra initdb arguments (split on white space)
#   POSTGRES_HOST_AUTH_METHOD  pg_hba method for TCP connections (default scram-sha-256)
#   PGDATA                 data directory (default /var/lib/postgresql/data)
#   *_FILE                 POSTGRES_USER_FILE, POSTGRES_DB_FILE, POSTGRES_INITDB_ARGS_FILE too
# On an empty PGDATA only: initdb, TCP access with a password, then /docker-entrypoint-initdb.d/
# (*.sh, *.sql, *.sql.gz in name order) against a server that listens on its unix socket only.
# Then `postgres "$@"` replaces this script, as the postgres user when started as root.
# `docker run IMAGE -c x=y` (first argument starting with "-") means `postgres -c x=y`; any other
# command (psql, pg_isready, bash, ...) is run as it is.
set -Eeuo pipefail

say() { printf '%s [botfleet-e2e entrypoint] %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$*" >&2; }
fail() { say "error: $*"; exit 1; }

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
  exec "$@"
fi
shift  # "$@" is now the server's own arguments

# `postgres --version`, `-C name`, `--help`...: ask the binary, initialise nothing
informational=no
for a in "$@"; do
  case "$a" in -V|--version|'-?'|--help|--describe-config|-C|-C*) informational=yes;; esac
done

# VAR_FILE -> VAR (the file's content, trailing newlines dropped); both set is an error
from_file() {
  local var=$1 file_var="${1}_FILE"
  if [ -n "${!file_var:-}" ]; then
    [ -z "${!var:-}" ] || fail "both $var and $file_var are set; use one"
    [ -r "${!file_var}" ] || fail "$file_var: cannot read ${!file_var}"
    printf -v "$var" '%s' "$(<"${!file_var}")"
  fi
  unset "$file_var"
}
from_file POSTGRES_USER
from_file POSTGRES_DB
from_file POSTGRES_INITDB_ARGS
from_file POSTGRES_PASSWORD
password=${POSTGRES_PASSWORD:-}
unset POSTGRES_PASSWORD  # the server and the init scripts never see it in their environment

POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
POSTGRES_HOST_AUTH_METHOD=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
export PGDATA=${PGDATA:-/var/lib/postgresql/data}
export POSTGRES_USER POSTGRES_DB

# Run a command as the postgres user: via setpriv when we are root, as we are otherwise
# (docker run --user UID: that user must own PGDATA).
if [ "$(id -u)" = 0 ]; then
  pg_home=$(getent passwd postgres | cut -d: -f6)
  as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- env HOME="$pg_home" USER=postgres "$@"; }
  # root's part: the data directory and the socket directory belong to postgres
  mkdir -p "$PGDATA" /var/run/postgresql
  chmod 0700 "$PGDATA"
  find "$PGDATA" -xdev \! -user postgres -exec chown postgres:postgres {} +
  chown postgres:postgres /var/run/postgresql
  chmod 3777 /var/run/postgresql
else
  as_postgres() { "$@"; }
  mkdir -p "$PGDATA" 2>/dev/null || true
  chmod 0700 "$PGDATA" 2>/dev/null || true
fi

if [ "$informational" = yes ]; then
  :
elif [ -s "$PGDATA/PG_VERSION" ]; then
  say "PostgreSQL $(cat "$PGDATA/PG_VERSION") data directory found in $PGDATA; skipping initialisation"
else
  say "empty data directory $PGDATA: initialising"
  if [ -z "$password" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
    fail "no superuser password: set POSTGRES_PASSWORD_FILE (or POSTGRES_PASSWORD)"
  fi
  workdir=$(mktemp -d)
  trap 'rm -rf "$workdir"' EXIT
  initdb_args=(--username="$POSTGRES_USER" --auth-local=trust --auth-host="$POSTGRES_HOST_AUTH_METHOD")
  if [ -n "$password" ]; then
    # initdb reads the password from a file readable by postgres only: not on a command line,
    # not in an environment variable, not in the log
    (umask 077; printf '%s\n' "$password" >"$workdir/pw")
    initdb_args+=(--pwfile="$workdir/pw")
  fi
  if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$workdir"; fi
  read -r -a extra <<<"${POSTGRES_INITDB_ARGS:-}"
  as_postgres initdb "${initdb_args[@]}" "${extra[@]}"
  rm -f "$workdir/pw"

  # TCP from any address, with a password (localhost lines come from --auth-host above)
  printf '\n# botfleet e2e stand-in: TCP connections from anywhere need a password\nhost all all all %s\n' \
    "$POSTGRES_HOST_AUTH_METHOD" >>"$PGDATA/pg_hba.conf"

  # A temporary server for the set-up, reachable through its unix socket only. The caller's
  # arguments (e.g. -c config_file=...) apply to it too; listen_addresses='' comes last and wins.
  pgport_given=${PGPORT+yes}
  export PGPORT=${PGPORT:-5432}
  opts=""
  for a in "$@"; do opts+="$(printf '%q' "$a") "; done
  as_postgres pg_ctl -D "$PGDATA" -w -t 120 -o "$opts-c listen_addresses='' -p $PGPORT" start
  psql_setup=(psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password --username "$POSTGRES_USER")

  if [ "$POSTGRES_DB" != postgres ]; then
    as_postgres "${psql_setup[@]}" --dbname postgres --set db="$POSTGRES_DB" <<'SQL'
SELECT format('CREATE DATABASE %I', :'db')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL
  fi

  shopt -s nullglob
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh)
        say "running $f"
        if [ -x "$f" ]; then as_postgres "$f"; else as_postgres bash "$f"; fi ;;
      *.sql)
        say "running $f"
        as_postgres "${psql_setup[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
      *.sql.gz)
        say "running $f"
        gzip -dc "$f" | as_postgres "${psql_setup[@]}" --dbname "$POSTGRES_DB" ;;
      *) say "ignoring $f" ;;
    esac
  done
  shopt -u nullglob

  as_postgres pg_ctl -D "$PGDATA" -m fast -w stop
  [ -n "$pgport_given" ] || unset PGPORT
  rm -rf "$workdir"
  trap - EXIT
  say "initialisation complete"
fi

unset password
if [ "$(id -u)" = 0 ]; then
  exec setpriv --reuid=postgres --regid=postgres --init-groups -- env HOME="$pg_home" USER=postgres postgres "$@"
fi
exec postgres "$@"
