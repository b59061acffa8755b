#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the distributed-tuning test.
#
#   .ci/postgres.sh start DIR   # initdb in DIR, start on a free port, create database
#                               # `optuna`; prints its SQLAlchemy URL on stdout
#   .ci/postgres.sh stop DIR    # stop the server (DIR can then be deleted)
#   .ci/postgres.sh down DIR    # stop it for a while (an outage)...
#   .ci/postgres.sh up DIR      # ...and start it again, same port and data
#
# Installs Debian's `postgresql` package first if no server binaries are found (needs
# root and apt-get). PostgreSQL refuses to run as root, so as root the server runs as the
# `postgres` user (created by the package), and DIR is handed to that user. The password
# is random and lives only in the printed URL; connections need it (scram-sha-256).
set -euo pipefail

usage() { echo "usage: $0 start|stop|down|up DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)

find_bin() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$found" ] && command -v pg_ctl >/dev/null 2>&1; then
    found=$(dirname "$(command -v pg_ctl)")
  fi
  echo "$found"
}

bin=$(find_bin)
if [ -z "$bin" ] && [ "$action" = start ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing PostgreSQL (apt-get install postgresql)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
    bin=$(find_bin)
  fi
fi
[ -n "$bin" ] || { echo "PostgreSQL server binaries not found and could not be installed" >&2; exit 3; }

# Run as the invoking user, or as `postgres` when we are root.
as_server_user() {
  if [ "$(id -u)" -ne 0 ]; then
    "$@"
  elif command -v runuser >/dev/null 2>&1; then
    runuser -u postgres -- "$@"
  else
    su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
  fi
}

case "$action" in
  start)
    if [ "$(id -u)" -eq 0 ]; then
      id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" --shell /usr/sbin/nologin postgres
      chown -R postgres "$dir"
      chmod 700 "$dir"
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    printf '%s\n' "$password" > "$dir/pwfile"
    [ "$(id -u)" -ne 0 ] || chown postgres "$dir/pwfile"
    as_server_user "$bin/initdb" -D "$dir/data" -U ssod --pwfile="$dir/pwfile" \
      --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 4; }
    rm -f "$dir/pwfile"
    echo "$port" > "$dir/port"
    as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c fsync=off" start >&2 \
      || { cat "$dir/server.log" >&2; exit 5; }
    PGPASSWORD=$password "$bin/psql" -h 127.0.0.1 -p "$port" -U ssod -d postgres -q -v ON_ERROR_STOP=1 \
      -c "CREATE DATABASE optuna" >&2
    echo "postgresql+psycopg2://ssod:${password}@127.0.0.1:${port}/optuna"
    ;;
  stop|down)
    [ -d "$dir/data" ] || exit 0
    as_server_user "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    ;;
  up)
    [ -f "$dir/port" ] || { echo "$dir: no server started here (run start first)" >&2; exit 6; }
    port=$(cat "$dir/port")
    as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c fsync=off" start >&2 \
      || { cat "$dir/server.log" >&2; exit 5; }
    ;;
  *)
    usage
    ;;
esac
