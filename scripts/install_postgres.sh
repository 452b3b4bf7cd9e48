#!/usr/bin/env bash
# Make sure the PostgreSQL server binaries the tests start (initdb, pg_ctl, postgres, pg_isready) are
# installed; `make test` runs this before pytest. Idempotent: when they are found it changes nothing.
# Otherwise it installs Debian's `postgresql` package with apt-get, as root directly or through sudo,
# and runs `apt-get update` only when the install fails without it (a fresh container has no lists).
#
# The tests never use the cluster the package may create on port 5432: tests/pg_server.py runs
# throwaway servers on free loopback ports. Elsewhere than Debian/Ubuntu, install PostgreSQL yourself
# and point SLUICE_PG_BIN_DIR at the directory holding those binaries.
set -euo pipefail

required=(initdb pg_ctl postgres pg_isready)

has_binaries() {
  local dir=$1 name
  for name in "${required[@]}"; do
    [[ -x "$dir/$name" ]] || return 1
  done
}

# The same search as tests/pg_server.py (find_postgres_bin_dir).
find_bin_dir() {
  if [[ -n "${SLUICE_PG_BIN_DIR:-}" ]]; then
    if has_binaries "$SLUICE_PG_BIN_DIR"; then echo "$SLUICE_PG_BIN_DIR"; fi
    return 0
  fi
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if has_binaries "$dir"; then echo "$dir"; return; fi
  done
  local initdb
  if initdb=$(command -v initdb); then
    dir=$(dirname "$(readlink -f "$initdb")")
    if has_binaries "$dir"; then echo "$dir"; fi
  fi
  return 0
}

found=$(find_bin_dir)
if [[ -n "$found" ]]; then
  echo "PostgreSQL server binaries: $found"
  exit 0
fi
if [[ -n "${SLUICE_PG_BIN_DIR:-}" ]]; then
  echo "SLUICE_PG_BIN_DIR=$SLUICE_PG_BIN_DIR does not hold ${required[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "PostgreSQL server binaries not found and apt-get is unavailable: install PostgreSQL's server" \
       "and set SLUICE_PG_BIN_DIR to the directory holding ${required[*]}" >&2
  exit 1
fi

as_root=()
if [[ $(id -u) -ne 0 ]]; then
  if ! command -v sudo >/dev/null; then
    echo "PostgreSQL server binaries not found; installing them needs root or sudo" \
         "(or set SLUICE_PG_BIN_DIR to an existing PostgreSQL bin directory)" >&2
    exit 1
  fi
  as_root=(sudo)
fi

install() {
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends postgresql </dev/null
}

echo "PostgreSQL server binaries not found; installing Debian's postgresql package"
if ! install; then
  echo "apt-get install failed; updating the package lists and trying again"
  "${as_root[@]}" apt-get update </dev/null
  install
fi

found=$(find_bin_dir)
if [[ -z "$found" ]]; then
  echo "postgresql was installed but ${required[*]} are still not found" >&2
  exit 1
fi
echo "PostgreSQL server binaries: $found"
