# shellcheck shell=bash
# PostgreSQL for the multi-writer store tests. Sourced by .ci/run (as root on Debian 12, no
# systemd); usable by hand too: `. .ci/postgres.sh` on a developer machine with sudo rights.
#
# Installs Debian's postgresql if missing, creates (once) a cluster named "evomerge" listening on
# 127.0.0.1 only, starts it unless it already runs, creates a role and a database, and exports
#   EVOMERGE_TEST_POSTGRES_URL=postgresql://evomerge:evomerge@127.0.0.1:$PORT/evomerge
# Running it again reuses the running server. Port: $EVOMERGE_PG_PORT (default 5433, so that a
# stock "main" cluster on 5432 is left alone).
#
# .ci/run sources this inside `step ... || rc=$?`, where bash ignores `set -e`: every command
# that matters is checked explicitly, and the function returns non-zero on the first failure.

_evomerge_postgres() {
  local port=${EVOMERGE_PG_PORT:-5433} cluster=evomerge version
  if ! command -v pg_ctlcluster >/dev/null || ! ls /usr/lib/postgresql/*/bin/postgres \
      >/dev/null 2>&1; then
    echo "postgres.sh: installing Debian's postgresql"
    apt-get update -qq || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql \
      >/dev/null || return 1
  fi
  version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
  [[ -n "$version" ]] || { echo "postgres.sh: no PostgreSQL server found" >&2; return 1; }

  if [[ -z "$(pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c')" ]]; then
    pg_createcluster "$version" "$cluster" -p "$port" >/dev/null || return 1
  fi
  # Debian's postgresql.conf reads conf.d/ last: our settings win over its defaults.
  printf "%s\n" "listen_addresses = '127.0.0.1'" "max_connections = 200" \
    > "/etc/postgresql/${version}/${cluster}/conf.d/evomerge.conf" || return 1
  local status
  status=$(pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c {print $4}')
  port=$(pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c {print $3}')
  if [[ "$status" != online ]]; then
    pg_ctlcluster "$version" "$cluster" start || return 1
  fi
  local i
  for i in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p "$port" && break
    sleep 1
  done
  pg_isready -h 127.0.0.1 -p "$port" || return 1

  _evomerge_psql() { runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qtA -p "$port" "$@"; }
  if [[ -z "$(_evomerge_psql -c "SELECT 1 FROM pg_roles WHERE rolname = 'evomerge'")" ]]; then
    _evomerge_psql -c "CREATE ROLE evomerge LOGIN CREATEDB PASSWORD 'evomerge'" || return 1
  fi
  if [[ -z "$(_evomerge_psql -c "SELECT 1 FROM pg_database WHERE datname = 'evomerge'")" ]]; then
    _evomerge_psql -c "CREATE DATABASE evomerge OWNER evomerge" || return 1
  fi
  unset -f _evomerge_psql
  export EVOMERGE_TEST_POSTGRES_URL="postgresql://evomerge:evomerge@127.0.0.1:${port}/evomerge"
  echo "postgres.sh: PostgreSQL ${version} at ${EVOMERGE_TEST_POSTGRES_URL}"
}

_evomerge_postgres
