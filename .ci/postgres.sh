#!/usr/bin/env bash
# Install (Debian) and start PostgreSQL 15 on loopback for the many-workers test, then print a
# connection URL. Idempotent: a second call reuses the running server, role and database.
set -euo pipefail

start_server() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
  fi
  local version
  version=$(ls /etc/postgresql | sort -n | tail -n 1)
  # Listen on loopback only: nothing outside this machine may reach it.
  sed -i "s/^#\?listen_addresses.*/listen_addresses = '127.0.0.1'/" \
    "/etc/postgresql/$version/main/postgresql.conf"
  pg_ctlcluster "$version" main status >/dev/null 2>&1 || pg_ctlcluster "$version" main start
  as_postgres "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='fm_optuna'\"" | grep -q 1 \
    || as_postgres "psql -qc \"CREATE ROLE fm_optuna LOGIN PASSWORD 'fm_optuna' CREATEDB\""
  as_postgres "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='fm_optuna_test'\"" | grep -q 1 \
    || as_postgres "createdb -O fm_optuna fm_optuna_test"
}
as_postgres() { su postgres -c "$1"; }

# Callers capture stdout, so it carries the URL alone: every message from apt, pg_ctlcluster or
# psql (e.g. "Removed stale pid file.") goes to stderr. No extra descriptor is opened, because the
# server started here would inherit it and keep the caller's $(...) waiting forever.
start_server >&2
echo "postgresql://fm_optuna:fm_optuna@127.0.0.1:5432/fm_optuna_test"
