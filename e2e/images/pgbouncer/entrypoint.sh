#!/bin/sh
# Entrypoint of the e2e stand-in for edoburu/pgbouncer (see the Dockerfile): botfleet mounts
# /etc/pgbouncer/pgbouncer.ini (a config) and /etc/pgbouncer/userlist.txt (a secret), so there is
# nothing to generate. Like that image: a missing userlist is created empty; then the command runs.
set -e
conf=/etc/pgbouncer
if [ ! -e "$conf/userlist.txt" ]; then
  touch "$conf/userlist.txt"
fi
if [ "${1:-}" = /usr/bin/pgbouncer ] && [ ! -f "$conf/pgbouncer.ini" ]; then
  echo "e2e pgbouncer stand-in: no $conf/pgbouncer.ini mounted (this stand-in does not generate one)" >&2
  exit 1
fi
exec "$@"
