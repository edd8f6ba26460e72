#!/usr/bin/env bash
# Installs what the tests need beyond Rust, so that `cargo test` itself stays offline:
#   - a Python virtual environment with the official `openai` package, in
#     target/openai-venv (or $METAORCH_OPENAI_VENV), for the test that drives
#     `metaorch serve` with the official client;
#   - `redis-server`, which the Redis tests start on 127.0.0.1 (they never use a
#     Redis already running).
# Safe to run again: what is already there is kept. Needs the Python and Debian
# package registries on first run only.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${METAORCH_OPENAI_VENV:-target/openai-venv}"

have_venv_module() { python3 -c 'import venv, ensurepip' >/dev/null 2>&1; }

if ! command -v python3 >/dev/null 2>&1 || ! have_venv_module; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "test-deps: installing python3 and python3-venv with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    else
        echo "test-deps: python3 with the venv module is needed; install python3 and python3-venv" >&2
        exit 1
    fi
fi

if "$venv/bin/python" -c 'import openai' >/dev/null 2>&1; then
    echo "test-deps: $venv has openai $("$venv/bin/python" -c 'import openai; print(openai.__version__)')"
else
    echo "test-deps: creating $venv with the openai package"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'openai>=1.40'
    "$venv/bin/python" -c 'import openai; print("test-deps: openai", openai.__version__)'
fi

if command -v redis-server >/dev/null 2>&1; then
    echo "test-deps: $(redis-server --version | cut -d' ' -f1-3)"
else
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "test-deps: redis-server is needed and there is no apt-get here; install Redis (6 or later) so that redis-server is on PATH" >&2
        exit 1
    fi
    if [ "$(id -u)" = 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo)
    else
        echo "test-deps: redis-server is needed; run as root (or with sudo): apt-get install -y redis-server" >&2
        exit 1
    fi
    echo "test-deps: installing redis-server with apt-get"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    # The package starts a system Redis on port 6379 where services run; the tests
    # start their own on free ports and need none.
    echo "test-deps: $(redis-server --version | cut -d' ' -f1-3)"
fi
