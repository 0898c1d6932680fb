#!/usr/bin/env bash
# Installs everything the edgesync test suite needs on a fresh Debian machine that has only a
# Rust toolchain (rustup + cargo). Safe to re-run: every step is idempotent.
#
# Runs as root directly, otherwise through sudo. Non-interactive (CI has no stdin).
#
# Layout: one function per kind of dependency, called in order from the bottom of this file.
# A new test dependency (for example a Python venv with pymodbus, or mosquitto) gets its own
# install_* function here, its apt packages added to APT_PACKAGES with a comment saying who
# uses them, and one line in the "main" section.
set -euo pipefail

banner() { printf '\n==> setup: %s\n' "$*"; }
die() { printf '\nsetup-debian.sh: error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [[ ${EUID} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -- "$@"
    else
        die "not running as root and sudo is not installed; run as root or install sudo"
    fi
}

# ---------------------------------------------------------------------------------------------
# System packages (apt). Each entry says who needs it.
# ---------------------------------------------------------------------------------------------
APT_PACKAGES=(
    ca-certificates        # cargo fetches crates over HTTPS
    gcc libc6-dev          # host linker; ring's C/assembly for host builds and tests
    gcc-aarch64-linux-gnu  # aarch64 cross linker + C compiler (ring) for edgesync-agent
    libc6-dev-arm64-cross  # aarch64 libc to link against (a Recommends of the line above)
    file                   # test.sh checks the cross-built agent is an aarch64 ELF
    procps                 # `kill`, used by the testkit harness to SIGTERM agent/hub processes
    mosquitto              # edge/tests/mqtt.rs runs the agent's MQTT bus against a real Mosquitto (+ mosquitto_passwd)
    strace                 # tests/tests/integration/durability.rs checks every ack follows an fsync of the store
)

install_apt_packages() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script supports Debian only"
    banner "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    banner "apt-get install ${APT_PACKAGES[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
}

# ---------------------------------------------------------------------------------------------
# Rust toolchain components and targets.
# ---------------------------------------------------------------------------------------------
install_rust_components() {
    command -v rustup >/dev/null 2>&1 || die "rustup not found: install a Rust toolchain first (https://rustup.rs)"
    command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH (is ~/.cargo/bin on PATH?)"
    banner "rustup component add rustfmt clippy"
    rustup component add rustfmt clippy
    banner "rustup target add aarch64-unknown-linux-gnu"
    rustup target add aarch64-unknown-linux-gnu
}

# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
install_apt_packages
install_rust_components
banner "done"
