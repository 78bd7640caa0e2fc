# The virtual environment scripts/demo and scripts/test run in (sourced by both; bash).
#
# They never install into the interpreter they were started with: `zeroload_venv` makes
# `.venv/` in the checkout (ZEROLOAD_VENV=DIR puts it elsewhere) from `python3` (or from
# $PYTHON), reuses it on the next run, and sets
#   PY   the venv's python (what the scripts run)
#   PIP  an array: the command that installs into the venv ("${PIP[@]}" install ...)
# If that interpreter is itself a virtual environment's (an activated venv's python3, or
# PYTHON=venv/bin/python), that environment is used as it is: it is the user's, made to be
# installed into. The venv is remade when $PYTHON names
# another interpreter than the one it was made from (only a venv this file made: its
# marker file says so; any other directory in the way is an error, never removed).
#
# Making it: `python -m venv`; where that fails because ensurepip is missing (Debian and
# Ubuntu without the python3-venv package), `python -m virtualenv` if installed, else a
# venv without pip of its own that the interpreter's pip installs into (pip --python,
# pip >= 22.3). When none works, it says what to install and returns 1.

_zeroload_venv_marker=zeroload-venv-base

_zeroload_venv_say() { echo "venv: $*" >&2; }

# Prints the interpreter's real path (the base interpreter for one inside a venv).
_zeroload_venv_base() {
    "$1" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))'
}

_zeroload_venv_make() {
    local base=$1 dir=$2 out
    if out=$("$base" -m venv "$dir" 2>&1); then
        return 0
    fi
    rm -rf "$dir"
    if "$base" -m virtualenv --version >/dev/null 2>&1; then
        _zeroload_venv_say "python -m venv failed; using virtualenv"
        "$base" -m virtualenv --quiet "$dir" >&2 && return 0
        rm -rf "$dir"
    fi
    if "$base" -m venv --without-pip "$dir" >/dev/null 2>&1 &&
        "$base" -m pip --python "$dir/bin/python" --version >/dev/null 2>&1; then
        _zeroload_venv_say "python -m venv could not install pip (no ensurepip); the venv has" \
            "no pip of its own, and $base's pip installs into it"
        return 0
    fi
    rm -rf "$dir"
    {
        echo "venv: cannot make a virtual environment with $base:"
        echo "$out" | sed 's/^/    /'
        echo "Install one of these and run again (nothing was installed anywhere):"
        echo "    sudo apt install python3-venv     # Debian, Ubuntu: venv's ensurepip"
        echo "    python3 -m pip install --user virtualenv"
        echo "or point PYTHON= at an interpreter that has venv, or at a virtual environment's"
        echo "python (it is then used as it is)."
    } >&2
    return 1
}

zeroload_venv() {
    local root dir base want have
    root=$(pwd)
    dir=${ZEROLOAD_VENV:-$root/.venv}
    case $dir in /*) ;; *) dir="$root/$dir" ;; esac
    base=${PYTHON:-python3}
    case $base in /*) ;; */*) base="$root/$base" ;; esac
    if ! command -v "$base" >/dev/null 2>&1; then
        echo "venv: no Python interpreter '$base' (set PYTHON=/path/to/python3)" >&2
        return 1
    fi
    if "$base" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
        PY=$base
        PIP=("$PY" -m pip)
        _zeroload_venv_say "using the virtual environment of $PY as it is"
        return 0
    fi
    want=$(_zeroload_venv_base "$base") || return 1
    if [ -e "$dir" ]; then
        if [ ! -f "$dir/$_zeroload_venv_marker" ]; then
            echo "venv: $dir exists but was not made by scripts/venv.sh; remove it, or set" \
                "ZEROLOAD_VENV=DIR (or PYTHON= a virtual environment's python)" >&2
            return 1
        fi
        have=$(cat "$dir/$_zeroload_venv_marker")
        if [ "$have" != "$want" ] || [ ! -x "$dir/bin/python" ]; then
            _zeroload_venv_say "remaking $dir (made from $have, now $want)"
            rm -rf "$dir"
        fi
    fi
    if [ ! -e "$dir" ]; then
        _zeroload_venv_say "making a virtual environment in $dir (from $want)"
        _zeroload_venv_make "$base" "$dir" || return 1
        echo "$want" >"$dir/$_zeroload_venv_marker"
    fi
    PY=$dir/bin/python
    if "$PY" -m pip --version >/dev/null 2>&1; then
        PIP=("$PY" -m pip)
    else
        PIP=("$base" -m pip --python "$PY")
    fi
    return 0
}
