# Sourced by scripts/run and scripts/test: make .venv (Python >= 3.12) and install the project.
# Finds an interpreter by itself: $MITMCACHE_PYTHON, then python3.13/3.12/python3 on PATH,
# then pyenv and common install locations. Fails with a clear message when none is >= 3.12.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

_py_ok() {  # usable if it runs and is >= 3.12 with venv support
    "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local c
    for c in "${MITMCACHE_PYTHON:-}" python3.13 python3.12 python3; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 && _py_ok "$(command -v "$c")"; then
            command -v "$c"; return 0
        fi
    done
    for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 \
             /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9] /opt/python*/bin/python3; do
        if [ -x "$c" ] && _py_ok "$c"; then echo "$c"; return 0; fi
    done
    return 1
}

if [ ! -x "$VENV/bin/python" ] || ! _py_ok "$VENV/bin/python"; then
    if ! PY="$(find_python)"; then
        echo "mitmcache: needs Python >= 3.12 (mitmproxy 12), but none was found." >&2
        echo "  Looked at \$MITMCACHE_PYTHON, python3.13, python3.12, python3 and ~/.pyenv/versions." >&2
        echo "  Install one (e.g. 'pyenv install 3.12') or set MITMCACHE_PYTHON=/path/to/python3.12." >&2
        exit 1
    fi
    echo "mitmcache: creating .venv with $PY ($("$PY" --version 2>&1))" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi

# Reinstall only when the project's dependencies changed.
STAMP="$VENV/.mitmcache-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "mitmcache: installing dependencies into .venv ..." >&2
    # [fast]: uvloop for scripts/run's fast launcher (it runs on asyncio's own loop without it).
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test,fast]"
    echo "$WANT" > "$STAMP"
fi
