"""scripts/venv.sh, scripts/test and scripts/demo: the two README commands install into a
virtual environment of their own (never the system Python), and the test command installs
nothing else unless asked (the cross-checks run with CI=true or ZEROLOAD_CROSS=1).

The venv logic runs for real against this machine's base interpreter; where a failure is
needed (no ensurepip, as on Debian without python3-venv) a wrapper around it fails the way
Debian's does. scripts/test and scripts/demo run with fake `python`, `cargo` and `rustup`
that record their arguments, so what they would run is checked without running it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_SH = ROOT / "scripts" / "venv.sh"
# The interpreter this test's venv was made from (venv.sh refuses nothing about it).
BASE = os.path.realpath(getattr(sys, "_base_executable", sys.executable))

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("bash") is None, reason="bash scripts"
)


def _venv(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Source venv.sh in ``cwd`` and print what ``zeroload_venv`` set."""
    script = (
        f"source {VENV_SH}; zeroload_venv || exit $?; "
        'echo "PY=$PY"; printf "PIP=%s\\n" "${PIP[@]}"'
    )
    full = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "ZEROLOAD_VENV")}
    full.update(env)
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=full, capture_output=True, text=True, timeout=300
    )


def _values(out: str, key: str) -> list:
    return [ln.split("=", 1)[1] for ln in out.splitlines() if ln.startswith(key + "=")]


def _wrapper(folder: Path, body: str) -> Path:
    """A `python3` that runs ``body`` (bash) before handing over to the real interpreter."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "python3"
    path.write_text(f'#!/usr/bin/env bash\n{body}\nexec "{BASE}" "$@"\n')
    path.chmod(0o755)
    return path


# Debian's python3 without the python3-venv package: `-m venv` fails unless --without-pip.
_NO_ENSUREPIP = """
if [ "$1 $2" = "-m venv" ] && [[ " $* " != *" --without-pip "* ]]; then
    echo "The virtual environment was not created successfully because ensurepip is not"
    echo "available.  On Debian/Ubuntu systems, you need to install the python3-venv"
    echo "package using the following command."
    exit 1
fi
"""


_HAS_ENSUREPIP = (
    subprocess.run([BASE, "-c", "import ensurepip"], capture_output=True).returncode == 0
)


@pytest.mark.skipif(not _HAS_ENSUREPIP, reason="the base interpreter has no ensurepip")
def test_venv_is_made_in_the_checkout_and_reused(tmp_path: Path) -> None:
    r = _venv(tmp_path, PYTHON=BASE)
    assert r.returncode == 0, r.stderr
    venv = tmp_path / ".venv"
    assert _values(r.stdout, "PY") == [str(venv / "bin" / "python")]
    assert _values(r.stdout, "PIP") == [str(venv / "bin" / "python"), "-m", "pip"]
    assert "making a virtual environment" in r.stderr
    # a real venv, with a pip of its own, made from the base interpreter
    prefix = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys; print(sys.prefix != sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert prefix.stdout.strip() == "True"
    stamp = (venv / "pyvenv.cfg").stat().st_mtime_ns
    again = _venv(tmp_path, PYTHON=BASE)
    assert again.returncode == 0, again.stderr
    assert "making" not in again.stderr and "remaking" not in again.stderr
    assert (venv / "pyvenv.cfg").stat().st_mtime_ns == stamp  # reused, not remade
    assert _values(again.stdout, "PY") == [str(venv / "bin" / "python")]


def test_venv_is_remade_for_another_interpreter(tmp_path: Path) -> None:
    venv = tmp_path / "env"
    first = _venv(tmp_path, PYTHON=BASE, ZEROLOAD_VENV="env")
    assert first.returncode == 0, first.stderr
    (venv / "zeroload-venv-base").write_text("/some/other/python3\n")
    r = _venv(tmp_path, PYTHON=BASE, ZEROLOAD_VENV="env")
    assert r.returncode == 0, r.stderr
    assert "remaking" in r.stderr and "/some/other/python3" in r.stderr
    assert (venv / "zeroload-venv-base").read_text().strip() == BASE


def test_without_ensurepip_the_interpreters_pip_installs_into_the_venv(tmp_path: Path) -> None:
    py = _wrapper(
        tmp_path / "bin", _NO_ENSUREPIP + 'if [ "$1 $2" = "-m virtualenv" ]; then exit 1; fi'
    )
    work = tmp_path / "work"
    work.mkdir()
    r = _venv(work, PYTHON=str(py))
    assert r.returncode == 0, r.stderr
    assert "no ensurepip" in r.stderr
    venv_py = str(work / ".venv" / "bin" / "python")
    assert _values(r.stdout, "PY") == [venv_py]
    pip = _values(r.stdout, "PIP")
    assert pip == [str(py), "-m", "pip", "--python", venv_py]
    # that pip command lists the venv's packages (none: not even pip), not the base's
    base_list = subprocess.run(
        [BASE, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    )
    assert "pip==" in base_list.stdout
    venv_list = subprocess.run(
        [*pip, "list", "--format=freeze"], capture_output=True, text=True, timeout=120
    )
    assert venv_list.returncode == 0, venv_list.stderr
    assert "pip==" not in venv_list.stdout


def test_no_way_to_make_a_venv_says_what_to_install(tmp_path: Path) -> None:
    body = _NO_ENSUREPIP.replace(' && [[ " $* " != *" --without-pip "* ]]', "")
    py = _wrapper(tmp_path / "bin", body + 'if [ "$1 $2" = "-m virtualenv" ]; then exit 1; fi')
    work = tmp_path / "work"
    work.mkdir()
    r = _venv(work, PYTHON=str(py))
    assert r.returncode == 1
    assert "python3-venv" in r.stderr and "virtualenv" in r.stderr
    assert "ensurepip is not" in r.stderr  # the interpreter's own reason, shown
    assert "nothing was installed" in r.stderr
    assert list(work.iterdir()) == []  # no half-made venv left


def test_a_virtual_environment_given_is_used_as_it_is(tmp_path: Path) -> None:
    venv_py = tmp_path / "theirs" / "bin" / "python"
    _fake_venv_python(venv_py, tmp_path / "log")
    r = _venv(tmp_path, PYTHON=str(venv_py))
    assert r.returncode == 0, r.stderr
    assert _values(r.stdout, "PY") == [str(venv_py)]
    assert not (tmp_path / ".venv").exists()


def test_a_directory_it_did_not_make_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "keep").write_text("mine")
    r = _venv(tmp_path, PYTHON=BASE)
    assert r.returncode == 1
    assert "not made by scripts/venv.sh" in r.stderr
    assert (tmp_path / ".venv" / "keep").read_text() == "mine"


# -- the scripts, with recording fakes -------------------------------------------------


def _fake_venv_python(path: Path, log: Path) -> None:
    """A `python` that says it runs in a virtual environment and records every call."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/usr/bin/env bash\necho "python $*" >>"{log}"\nexit 0\n')
    path.chmod(0o755)


def _fake_tools(folder: Path, log: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for tool, code in (("cargo", 0), ("rustup", 1)):  # rustup: as if offline
        (folder / tool).write_text(
            f'#!/usr/bin/env bash\necho "{tool} $*" >>"{log}"\nexit {code}\n'
        )
        (folder / tool).chmod(0o755)


def _run_script(name: str, tmp_path: Path, *args: str, **env: str) -> tuple:
    log = tmp_path / "calls.log"
    log.touch()
    venv_py = tmp_path / "venv" / "bin" / "python"
    _fake_venv_python(venv_py, log)
    _fake_tools(tmp_path / "fakebin", log)
    full = {k: v for k, v in os.environ.items() if k not in ("CI", "ZEROLOAD_CROSS", "PYTHON")}
    full.update(
        PATH=f"{tmp_path / 'fakebin'}{os.pathsep}{full['PATH']}",
        PYTHON=str(venv_py),
        TMPDIR=str(tmp_path),
        **env,
    )
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / name), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r, log.read_text().splitlines(), str(venv_py)


def test_scripts_test_installs_into_the_venv_and_skips_cross_checks(tmp_path: Path) -> None:
    r, calls, _ = _run_script("test", tmp_path, "-k", "nothing")
    assert r.returncode == 0, r.stderr + r.stdout
    installs = [c for c in calls if " pip install" in c]
    assert installs == ["python -m pip install --quiet --disable-pip-version-check -e .[test]"]
    assert "python -m pytest -q -p no:cacheprovider" in "\n".join(calls)
    assert any(c.endswith("-k nothing") for c in calls)  # extra arguments go to pytest
    assert not [c for c in calls if c.startswith("rustup")]  # no targets added
    assert not [c for c in calls if "windows" in c]
    assert "ZEROLOAD_CROSS=1" in r.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("zeroload-")] == []


@pytest.mark.parametrize("opt_in", [{"CI": "true"}, {"ZEROLOAD_CROSS": "1"}])
def test_scripts_test_runs_cross_checks_when_asked(tmp_path: Path, opt_in: dict) -> None:
    r, calls, _ = _run_script("test", tmp_path, **opt_in)
    assert r.returncode == 0, r.stderr + r.stdout
    rustup = [c for c in calls if c.startswith("rustup target add")]
    assert any("aarch64-apple-darwin" in c for c in rustup)  # macOS check
    assert any("x86_64-pc-windows-msvc" in c for c in rustup)  # scripts/windows_check
    assert "windows check skipped" in r.stdout  # the fake rustup is offline


def test_scripts_demo_installs_into_the_venv(tmp_path: Path) -> None:
    r, calls, _ = _run_script("demo", tmp_path, "--size", "tiny")
    assert r.returncode == 0, r.stderr + r.stdout
    assert calls[-2:] == [
        "python -m pip install --quiet --disable-pip-version-check -e .[demo]",
        "python -m zeroload demo --size tiny",
    ]
