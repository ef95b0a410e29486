#!/usr/bin/env bash
# Start an authenticated MLflow tracking server for the tests, as a team would run one: MLflow's basic-auth app,
# the PostgreSQL server of .ci/postgres.sh as its backend store, artifacts proxied to a local folder, 127.0.0.1.
#
#   eval "$(.ci/mlflow_server.sh "$MEDSEG_TEST_POSTGRES")"
#
# Prints shell exports on stdout: MEDSEG_TEST_MLFLOW_SERVER (the URL), MEDSEG_TEST_MLFLOW_USER and
# MEDSEG_TEST_MLFLOW_PASSWORD (a fresh random admin password). Progress goes to stderr. Needs the `server` extra
# (mlflow[auth]). Every run starts from an empty database; the server keeps running after this script exits
# (stop it with: kill "$(cat $MEDSEG_MLFLOW_DIR/server.pid)").
set -euo pipefail

BASE="${1:?usage: mlflow_server.sh POSTGRES_URL_BASE (postgresql://user:pw@host:port)}"
PORT="${MEDSEG_MLFLOW_PORT:-55099}"
DIR="${MEDSEG_MLFLOW_DIR:-/tmp/medseg-mlflow-server}"
PYTHON="${PYTHON:-python}"
DATABASE=medseg_mlflow_server

log() { echo "mlflow_server.sh: $*" >&2; }

if [ -f "$DIR/server.pid" ] && kill -0 "$(cat "$DIR/server.pid")" 2>/dev/null; then
  log "stopping the server of an earlier run"
  kill -- "-$(cat "$DIR/server.pid")" 2>/dev/null || kill "$(cat "$DIR/server.pid")" || true
  sleep 2
fi
rm -rf "$DIR"
mkdir -p "$DIR/artifacts"

"$PYTHON" - "$BASE" "$DATABASE" <<'PY'
import sys

import sqlalchemy as sa

base, name = sys.argv[1], sys.argv[2]
engine = sa.create_engine(sa.make_url(base).set(database="postgres"), isolation_level="AUTOCOMMIT")
with engine.connect() as connection:
    connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
PY

PASSWORD="$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(18))')"
cat > "$DIR/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$DIR/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI

log "starting mlflow server on 127.0.0.1:$PORT (backend $DATABASE, artifacts $DIR/artifacts)"
(
  cd "$DIR"
  export MLFLOW_AUTH_CONFIG_PATH="$DIR/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$PASSWORD"
  export MLFLOW_FLASK_SERVER_SECRET_KEY="$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')"
  exec setsid "$PYTHON" -m mlflow server --app-name basic-auth --host 127.0.0.1 --port "$PORT" \
    --backend-store-uri "$BASE/$DATABASE" --artifacts-destination "$DIR/artifacts" --workers 2 \
    >"$DIR/server.log" 2>&1 9>&-
) &
echo $! > "$DIR/server.pid"

for _ in $(seq 1 120); do
  if "$PYTHON" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then
    log "ready"
    echo "export MEDSEG_TEST_MLFLOW_SERVER=http://127.0.0.1:$PORT"
    echo "export MEDSEG_TEST_MLFLOW_USER=admin"
    echo "export MEDSEG_TEST_MLFLOW_PASSWORD=$PASSWORD"
    exit 0
  fi
  sleep 1
done
log "the server did not answer within 120 s; its log:"
tail -n 30 "$DIR/server.log" >&2
exit 1
