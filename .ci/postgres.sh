#!/usr/bin/env bash
# Start (installing it first if needed) a private PostgreSQL server for the tests, on 127.0.0.1 only.
#
#   export MEDSEG_TEST_POSTGRES="$(.ci/postgres.sh | tail -1)"
#
# Leaves any other cluster alone: the server has its own data directory ($MEDSEG_PG_DIR, default
# /tmp/medseg-pg) and port ($MEDSEG_PG_PORT, default 55432), and keeps running after this script exits.
# Creates role medseg (password medseg, CREATEDB) and databases medseg_optuna and medseg_mlflow.
# Idempotent: a second run finds the server up and only checks the role and databases (well under a second).
# Progress goes to stderr; stdout is only the URL base postgresql://medseg:medseg@127.0.0.1:PORT.
# Stop it with: runuser -u postgres -- pg_ctl -D /tmp/medseg-pg/data stop   (as root)
set -euo pipefail

PORT="${MEDSEG_PG_PORT:-55432}"
DIR="${MEDSEG_PG_DIR:-/tmp/medseg-pg}"
DATA="$DIR/data"
SOCK="$DIR/run"
LOG="$DIR/postgres.log"
ROLE=medseg
PASSWORD=medseg
DATABASES=(medseg_optuna medseg_mlflow)

log() { echo "postgres.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ "$PORT" =~ ^[0-9]+$ ]] || die "MEDSEG_PG_PORT=$PORT is not a port number"
# Settings from the caller's environment must not redirect our own client and server commands.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGOPTIONS PGSERVICE PGDATA PGPASSWORD

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi

find_bindir() {  # newest Debian server install, else a `postgres` on PATH; prints its bin directory
  local candidate
  candidate="$(ls -d /usr/lib/postgresql/*/bin/postgres 2>/dev/null | sort -V | tail -1 || true)"
  [ -n "$candidate" ] || candidate="$(command -v postgres || true)"
  [ -n "$candidate" ] || return 1
  candidate="$(readlink -f "$candidate")"
  local bindir
  bindir="$(dirname "$candidate")"
  [ -x "$bindir/initdb" ] && [ -x "$bindir/pg_ctl" ] || return 1
  echo "$bindir"
}

if ! BIN="$(find_bindir)"; then
  log "no PostgreSQL server found; installing the Debian package postgresql"
  command -v apt-get >/dev/null || die "no PostgreSQL server and no apt-get to install one"
  if [ "${#SUDO[@]}" -gt 0 ] && ! command -v sudo >/dev/null; then die "not root and no sudo: cannot install postgresql"; fi
  "${SUDO[@]}" apt-get update -qq >&2
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  BIN="$(find_bindir)" || die "installed postgresql but found no server binary under /usr/lib/postgresql/*/bin"
fi
PSQL="$BIN/psql"
[ -x "$PSQL" ] || PSQL="$(command -v psql)" || die "no psql client next to $BIN/postgres nor on PATH"
VERSION="$("$BIN/postgres" --version)"  # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
[[ "$VERSION" =~ \)\ ([0-9]+) ]] || die "cannot parse the server version from: $VERSION"
MAJOR="${BASH_REMATCH[1]}"
log "using $VERSION from $BIN"

# PostgreSQL refuses to run as root: as root, run the server and admin commands as the postgres system user.
if [ "$(id -u)" -eq 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    log "creating system user postgres"
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
  as_pg() { (cd / && runuser -u postgres -- "$@"); }
  OWNER=postgres
else
  as_pg() { "$@"; }
  OWNER="$(id -un)"
fi

mkdir -p "$DIR"
# Two CI jobs on one machine: the second waits here instead of racing initdb. The server must not inherit
# fd 9 (pg_ctl ... 9>&- below), or it would hold this lock for its whole life and block every later run.
exec 9>"$DIR/setup.lock"
flock 9

pg_status() { as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }
ready() { as_pg "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 5 >/dev/null 2>&1; }
psql_admin() { as_pg "$PSQL" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -U postgres -d postgres "$@"; }

# A data directory from an interrupted initdb or another major version is scratch: start again.
if [ -d "$DATA" ] && ! pg_status; then
  if [ ! -f "$DATA/PG_VERSION" ] || [ "$(cat "$DATA/PG_VERSION")" != "$MAJOR" ]; then
    log "removing unusable data directory $DATA"
    rm -rf "$DATA"
  fi
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
  log "initialising $DATA"
  [ "$(id -u)" -ne 0 ] || chown -R "$OWNER:" "$DIR"
  chmod 700 "$DIR"
  mkdir -p "$SOCK"
  [ "$(id -u)" -ne 0 ] || chown "$OWNER:" "$SOCK"
  as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 \
    || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
  # Unix socket: trust, but only reachable by the owner (the directory is 0700). TCP: 127.0.0.1 with a password.
  cat >"$DATA/pg_hba.conf" <<EOF
local all all trust
host  all all 127.0.0.1/32 scram-sha-256
EOF
  echo "include_if_exists = 'medseg.conf'" >>"$DATA/postgresql.conf"
  [ "$(id -u)" -ne 0 ] || chown "$OWNER:" "$DATA/pg_hba.conf" "$DATA/postgresql.conf"
fi

# Rewritten on every run, so a changed MEDSEG_PG_PORT takes effect (with a restart below).
CONF="listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCK'
password_encryption = 'scram-sha-256'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200"
CONF_CHANGED=0
if [ "$(cat "$DATA/medseg.conf" 2>/dev/null || true)" != "$CONF" ]; then
  printf '%s\n' "$CONF" >"$DATA/medseg.conf"
  [ "$(id -u)" -ne 0 ] || chown "$OWNER:" "$DATA/medseg.conf"
  CONF_CHANGED=1
fi

if pg_status && [ "$CONF_CHANGED" -eq 1 ]; then
  log "configuration changed; restarting"
  as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 restart 9>&- >&2 || { tail -n 30 "$LOG" >&2; die "restart failed"; }
elif pg_status; then
  log "server already running ($DATA)"
else
  log "starting server on 127.0.0.1:$PORT (log: $LOG)"
  touch "$LOG"
  [ "$(id -u)" -ne 0 ] || chown "$OWNER:" "$LOG"
  as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start 9>&- >&2 \
    || { tail -n 30 "$LOG" >&2; die "server did not start (is port $PORT taken?)"; }
fi
ready || { tail -n 30 "$LOG" >&2; die "server is not accepting connections on 127.0.0.1:$PORT"; }

# Role and databases: create if missing; reset the password every time.
psql_admin <<EOF
SELECT format('CREATE ROLE %I LOGIN', '$ROLE') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$ROLE')
\gexec
ALTER ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
EOF
for db in "${DATABASES[@]}"; do
  psql_admin <<EOF
SELECT format('CREATE DATABASE %I OWNER %I', '$db', '$ROLE') WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$db')
\gexec
EOF
done

# Check the URL we hand out actually works over TCP with the password.
PGPASSWORD="$PASSWORD" as_pg "$PSQL" -X -q -tA -h 127.0.0.1 -p "$PORT" -U "$ROLE" -d "${DATABASES[0]}" -c 'SELECT 1' >/dev/null \
  || die "cannot log in as $ROLE over 127.0.0.1:$PORT"
log "ready: role $ROLE, databases ${DATABASES[*]}"
echo "postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT"
