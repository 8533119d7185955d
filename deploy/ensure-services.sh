#!/usr/bin/env bash
# Make sure the system packages and services deblur needs are present.
#
#   deploy/ensure-services.sh venv [PYTHON]
#                                    the venv module of PYTHON (default python3): Debian ships it
#                                    apart, as python3.X-venv (make runs this before creating its venv)
#   deploy/ensure-services.sh demo   redis-server (the local stack starts its own Redis)
#   deploy/ensure-services.sh test   the above, chromium (headless report screenshots) and a
#                                    PostgreSQL server answering on 127.0.0.1:5432 with a
#                                    database "test" that user postgres reaches without a password
#
# Installs from Debian with apt-get only what is missing, and only touches
# PostgreSQL's authentication when it installed PostgreSQL itself (or when
# DEBLUR_CONFIGURE_POSTGRES=1). With DEBLUR_TEST_POSTGRES_URL set, the tests use
# that server and PostgreSQL is left alone. Idempotent; quiet and fast when
# everything is there already.
set -euo pipefail

mode="${1:-demo}"
case "$mode" in
  demo | test | venv) ;;
  *)
    echo "usage: $0 demo|test|venv [PYTHON]" >&2
    exit 64
    ;;
esac

PG_HOST=127.0.0.1
PG_PORT=5432
PG_DB=test

say() { echo "ensure-services: $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    say "root is needed to run: $*"
    exit 1
  fi
}

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    say "apt-get not found; install these with your package manager: $*"
    exit 1
  fi
  # wait for a dpkg lock held by someone else instead of failing at once
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)
  if [ "$apt_updated" -eq 0 ]; then
    say "apt-get update"
    as_root "${apt[@]}" update -qq
    apt_updated=1
  fi
  say "apt-get install -y $*"
  as_root "${apt[@]}" install -y -qq "$@" >/dev/null
}

have() { command -v "$1" >/dev/null 2>&1; }

if [ "$mode" = venv ]; then
  python="${2:-python3}"
  if "$python" -c 'import ensurepip' 2>/dev/null; then
    exit 0
  fi
  version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ "$("$python" -c 'import sys; print(sys.base_prefix)')" != /usr ]; then
    say "$python has no ensurepip module, which python -m venv needs; install that Python with it"
    exit 1
  fi
  apt_install "python$version-venv"
  exit 0
fi
postgres_installed() { compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; }

want_postgres=0
if [ "$mode" = test ] && [ -z "${DEBLUR_TEST_POSTGRES_URL:-}" ]; then
  want_postgres=1
fi

missing=()
have redis-server || missing+=(redis-server)
installed_postgres=0
if [ "$mode" = test ]; then
  have chromium || have chromium-browser || missing+=(chromium)
  if [ "$want_postgres" -eq 1 ] && ! postgres_installed; then
    missing+=(postgresql)
    installed_postgres=1
  fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi

[ "$want_postgres" -eq 1 ] || exit 0

pg_answers() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" >/dev/null 2>&1; }
psql_postgres() { psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -w -X -q -tA "$@"; }
pg_trusts() { psql_postgres -d postgres -c 'select 1' >/dev/null 2>&1; }

# The cluster configured for our port, as pg_lsclusters prints it: "VERSION NAME PORT STATUS OWNER DATA LOG".
cluster() { pg_lsclusters -h 2>/dev/null | awk -v port="$PG_PORT" '$3 == port' | head -n 1; }

start_cluster() {
  local line version name
  line="$(cluster)"
  if [ -z "$line" ]; then
    version="$(basename "$(compgen -G '/usr/lib/postgresql/*' | sort -V | tail -n 1)")"
    name=main
    [ ! -d "/etc/postgresql/$version/main" ] || name=deblur-test
    say "creating PostgreSQL $version cluster $name on port $PG_PORT"
    as_root pg_createcluster "$version" "$name" --port "$PG_PORT" >/dev/null
    line="$(cluster)"
  fi
  read -r version name _ <<<"$line"
  say "starting PostgreSQL cluster $version/$name"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start || true
  for _ in $(seq 1 60); do
    pg_answers && return 0
    sleep 0.5
  done
  say "PostgreSQL $version/$name does not answer on $PG_HOST:$PG_PORT; see /var/log/postgresql/postgresql-$version-$name.log"
  return 1
}

trust_loopback() {
  local version name hba
  read -r version name _ <<<"$(cluster)"
  hba="/etc/postgresql/$version/$name/pg_hba.conf"
  if as_root grep -q '^# deblur: trust loopback' "$hba"; then
    return 0
  fi
  say "allowing passwordless connections from loopback in $hba (test database server)"
  # first matching line wins in pg_hba.conf, so these go on top; `cat >` keeps the file's owner and mode
  as_root sh -c '{ printf "%s\n" "$2" "host all all 127.0.0.1/32 trust" "host all all ::1/128 trust"; cat "$1"; } >"$1.deblur" &&
    cat "$1.deblur" >"$1" && rm -f "$1.deblur"' sh "$hba" "# deblur: trust loopback connections (test server set up by deploy/ensure-services.sh)"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" reload
}

if ! have pg_isready || ! have psql; then
  say "the PostgreSQL client (pg_isready, psql) is missing; the PostgreSQL tests will be skipped (CI: failed)"
  exit 0
fi
if ! pg_answers; then
  start_cluster || exit 0 # the tests then skip (or fail in CI) and say why
fi
if ! pg_trusts; then
  if [ "$installed_postgres" -eq 1 ] || [ "${DEBLUR_CONFIGURE_POSTGRES:-}" = 1 ]; then
    trust_loopback
  else
    say "PostgreSQL on $PG_HOST:$PG_PORT wants a password for user postgres; set DEBLUR_TEST_POSTGRES_URL=postgresql+psycopg://USER:PASSWORD@$PG_HOST:$PG_PORT/DB, or rerun with DEBLUR_CONFIGURE_POSTGRES=1 to trust loopback connections"
    exit 0
  fi
fi
if [ "$(psql_postgres -d postgres -c "select 1 from pg_database where datname = '$PG_DB'")" != 1 ]; then
  say "creating database $PG_DB"
  psql_postgres -d postgres -c "create database $PG_DB" >/dev/null
fi
