#!/usr/bin/env bash
# Installs what the platform needs on a fresh Debian/Ubuntu machine, then the Python environment.
# Safe to run again: every step checks first.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

uv_cmd() {
  if command -v uv >/dev/null 2>&1; then uv "$@"; else python3 -m uv "$@"; fi
}

if ! command -v uv >/dev/null 2>&1 && ! python3 -m uv --version >/dev/null 2>&1; then
  say "installing uv (Python package manager)"
  if python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip install --quiet --user uv 2>/dev/null \
      || python3 -m pip install --quiet uv 2>/dev/null \
      || python3 -m pip install --quiet --user --break-system-packages uv
  else
    echo "uv is missing and so is pip: install uv (https://docs.astral.sh/uv/) and re-run" >&2
    exit 1
  fi
fi

have_pg_server() {
  command -v initdb >/dev/null 2>&1 && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
have_pgcrypto() {
  ls /usr/share/postgresql/*/extension/pgcrypto.control >/dev/null 2>&1
}
if ! have_pg_server || ! have_pgcrypto; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing the PostgreSQL server and contrib packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib >/dev/null
    # The Debian package starts its own cluster; the platform runs a private one instead.
    (service postgresql stop >/dev/null 2>&1 || true)
  else
    echo "The PostgreSQL server binaries (with pgcrypto) are missing. Install them, e.g.:" >&2
    echo "  sudo apt-get install postgresql postgresql-contrib" >&2
    exit 1
  fi
fi

# pysaml2 checks and makes XML signatures with the xmlsec1 program (the API's SAML SSO).
if ! command -v xmlsec1 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing xmlsec1 (XML signatures for SAML SSO)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xmlsec1 >/dev/null
  else
    echo "xmlsec1 is missing (SAML signatures). Install it, e.g.:" >&2
    echo "  sudo apt-get install xmlsec1" >&2
    exit 1
  fi
fi

# Debian's Chromium: the compliance dashboard's browser tests (playwright drives /usr/bin/chromium;
# playwright's own browser download is never used).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium (headless browser tests of the compliance dashboard)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is missing (the dashboard's browser tests). Install it, e.g.:" >&2
    echo "  sudo apt-get install chromium" >&2
    exit 1
  fi
fi

say "syncing the Python environment (uv sync --frozen)"
# --compile-bytecode writes the .pyc files up front: every CLI call, Airflow task and dbt run
# imports Airflow or dbt, and where PYTHONDONTWRITEBYTECODE is set they would otherwise be compiled
# from source at every start (dbt alone: ~6 s instead of ~3 s). Here rather than in pyproject.toml,
# where uv would re-check all 17k files (~2 s) on every `uv run`.
uv_cmd sync --frozen --quiet --compile-bytecode

# The embedded document server (FerretDB) is built from its Go module once and cached by the digest
# of its launcher's sources (.cache/ferretdb/); a MongoDB named by MONGODB_URI needs none.
if [ -z "${MONGODB_URI:-}${STRIPE_PLATFORM_MONGODB_URI:-}" ]; then
  say "the embedded document server (FerretDB, built from its Go module on first run)"
  .venv/bin/python -m stripe_platform.runtime.ferretdb
fi

# The Debezium + Kafka path (docs/streaming.md): Java 17+ runs a Kafka broker and Kafka Connect with
# the Debezium PostgreSQL connector; Maven fetches their jars once from the project's pom
# (src/stripe_platform/runtime/kafka_stack/pom.xml) into .cache/kafka/<digest of the pom>/.
# STRIPE_PLATFORM_BOOTSTRAP_KAFKA=0 skips it (the Kafka tests then fetch on first use).
have_java17() {
  local java
  for java in "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java || true)" /usr/lib/jvm/*/bin/java; do
    [ -n "$java" ] && [ -x "$java" ] || continue
    "$java" -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])' && return 0
  done
  return 1
}
kafka_jars=".cache/kafka/$(sha256sum src/stripe_platform/runtime/kafka_stack/pom.xml | cut -c1-16)"
if [ "${STRIPE_PLATFORM_BOOTSTRAP_KAFKA:-1}" = 0 ]; then
  say "the Kafka stack: skipped (STRIPE_PLATFORM_BOOTSTRAP_KAFKA=0)"
elif [ -d "$kafka_jars" ] && have_java17; then
  say "the Kafka stack's jars: cached in $kafka_jars"
else
  if ! have_java17 || ! command -v mvn >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "installing Java 17 and Maven (the Kafka stack's runtime and fetcher)"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
    else
      echo "Java 17+ and Maven are missing: the Debezium + Kafka path needs them, e.g." >&2
      echo "  sudo apt-get install openjdk-17-jre-headless maven" >&2
      exit 1
    fi
  fi
  say "the Kafka stack's jars (Kafka, Kafka Connect, Debezium: fetched by Maven once)"
  .venv/bin/python -m stripe_platform.runtime.kafka
fi
