#!/usr/bin/env bash
# Creates the Python virtual environment the Modbus interop tests use: $ROOT/.venv with a
# pinned pymodbus (and pyserial, for the RTU server on a pseudo-terminal), plus Debian's socat
# (the pty pair of the RTU test). Safe to re-run: an existing venv with the pinned version is
# kept as it is. Fails loudly on anything missing.
#
# The tests find the interpreter through EDGESYNC_PYTHON (scripts/test.sh exports it), else
# at $ROOT/.venv/bin/python.
#
# Usage: scripts/setup-python.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV="${ROOT}/.venv"

# The pymodbus whose server the tests talk to. Its API (ModbusSlaveContext, FramerType,
# StartAsync*Server) is what tests/pymodbus/server.py is written against.
PYMODBUS_VERSION=3.8.6
PYSERIAL_VERSION=3.5

banner() { printf '\n==> setup-python: %s\n' "$*"; }
die() { printf '\nsetup-python.sh: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ ${EUID} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -- "$@"
    else
        die "not running as root and sudo is not installed; cannot install $*"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install these by hand: $*"
    if [[ ${APT_UPDATED} -eq 0 ]]; then
        banner "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update
        APT_UPDATED=1
    fi
    banner "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

# python3 itself, and the venv module with ensurepip (Debian splits it into python3-venv).
if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-venv
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
fi
python3 -c 'import venv, ensurepip' || die "python3 has no working venv/ensurepip module even after installing python3-venv"

# socat: the pseudo-terminal pair of the RTU interop test.
if ! command -v socat >/dev/null 2>&1; then
    apt_install socat
fi
command -v socat >/dev/null 2>&1 || die "socat is still missing after apt-get install socat"

installed_version() {
    "${VENV}/bin/python" -c 'import pymodbus, serial; print(pymodbus.__version__ + " " + serial.__version__)' 2>/dev/null || true
}

if [[ -x ${VENV}/bin/python && $(installed_version) == "${PYMODBUS_VERSION} ${PYSERIAL_VERSION}" ]]; then
    banner "${VENV} already has pymodbus ${PYMODBUS_VERSION} and pyserial ${PYSERIAL_VERSION}"
else
    if [[ ! -x ${VENV}/bin/python ]]; then
        banner "python3 -m venv ${VENV}"
        rm -rf "${VENV}"
        python3 -m venv "${VENV}" || die "python3 -m venv ${VENV} failed"
    fi
    banner "pip install pymodbus==${PYMODBUS_VERSION} pyserial==${PYSERIAL_VERSION}"
    "${VENV}/bin/python" -m pip install --disable-pip-version-check --quiet \
        "pymodbus==${PYMODBUS_VERSION}" "pyserial==${PYSERIAL_VERSION}" \
        || die "pip install of pymodbus ${PYMODBUS_VERSION} into ${VENV} failed"
    got=$(installed_version)
    [[ ${got} == "${PYMODBUS_VERSION} ${PYSERIAL_VERSION}" ]] \
        || die "${VENV} has pymodbus/pyserial '${got}', expected '${PYMODBUS_VERSION} ${PYSERIAL_VERSION}'"
fi

banner "ok: ${VENV}/bin/python ($("${VENV}/bin/python" --version 2>&1)), pymodbus ${PYMODBUS_VERSION}, $(command -v socat)"
