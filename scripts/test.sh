#!/usr/bin/env bash
# THE test command: runs the whole edgesync test suite on a fresh Debian machine that has only a
# Rust toolchain (rustup + cargo). It installs what it needs itself (scripts/setup-debian.sh),
# then runs, in order, stopping at the first failure:
#
#   1. setup        apt packages, rustfmt/clippy, the aarch64 target (scripts/setup-debian.sh);
#                   the Python venv with pymodbus and socat for the Modbus interop tests
#                   (scripts/setup-python.sh)
#   2. fmt          cargo fmt --all --check
#   3. clippy       cargo clippy --workspace --all-targets --locked -- -D warnings
#   4. test         cargo test --workspace --locked --no-fail-fast (unit + integration; the
#                   integration tests build the binaries and start real processes; every
#                   failing test binary is reported, not just the first), bounded by
#                   EDGESYNC_TEST_TIMEOUT_S (default 1200 s) so a hang fails instead of
#                   blocking CI forever
#   5. cross-build  release build of edgesync-agent for aarch64-unknown-linux-gnu, then its size
#                   and a check that it is an aarch64 ELF
#   6. fuzz         every fuzz/ target built and run briefly (scripts/fuzz-smoke.sh)
#
# Usage: scripts/test.sh        (CI: .ci/run)
# Prints the time of every step at the end, also when a step fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

CROSS_TARGET=aarch64-unknown-linux-gnu
AGENT_PACKAGE=edgesync-edge
AGENT_BIN=edgesync-agent

# ---------------------------------------------------------------------------------------------
# Step bookkeeping: a banner per step, its duration, a summary on exit (success or failure).
# ---------------------------------------------------------------------------------------------
STEP_NAMES=()
STEP_SECONDS=()
CURRENT_STEP=""
CURRENT_START=0
SCRIPT_START=${SECONDS}

begin_step() {
    CURRENT_STEP=$1
    CURRENT_START=${SECONDS}
    printf '\n'
    printf '=%.0s' {1..78}
    printf '\n=== %s: %s\n' "${CURRENT_STEP}" "$2"
    printf '=%.0s' {1..78}
    printf '\n'
}

end_step() {
    STEP_NAMES+=("${CURRENT_STEP}")
    STEP_SECONDS+=($((SECONDS - CURRENT_START)))
    CURRENT_STEP=""
}

summary() {
    local status=$?
    printf '\n=== summary\n'
    local i
    for i in "${!STEP_NAMES[@]}"; do
        printf '  %-12s ok      %4ds\n' "${STEP_NAMES[$i]}" "${STEP_SECONDS[$i]}"
    done
    if [[ -n ${CURRENT_STEP} ]]; then
        printf '  %-12s FAILED  %4ds\n' "${CURRENT_STEP}" "$((SECONDS - CURRENT_START))"
    fi
    printf '  %-12s         %4ds\n' "total" "$((SECONDS - SCRIPT_START))"
    if [[ ${status} -eq 0 ]]; then
        printf '\nALL CHECKS PASSED\n'
    else
        printf '\nFAILED (exit status %d) in step: %s\n' "${status}" "${CURRENT_STEP:-?}" >&2
    fi
}
trap summary EXIT

fail() { printf '\ntest.sh: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# 1. Setup: everything installed here; nothing assumed beyond Debian + rustup/cargo.
#    One script per kind of dependency; what the tests need from this shell (a venv's path, a
#    broker started for the tests) is exported right after the script that installs it.
#    Mosquitto (edge/tests/mqtt.rs and the integration tests start their own brokers) comes
#    with the Debian packages.
# ---------------------------------------------------------------------------------------------
begin_step setup "install system packages, Rust components and the Python venv"
# Disk first: a full test build (host + aarch64 release + fuzz) needs several GB. A disk that
# fills mid-build fails with a rustc I/O error far from the cause; say it here instead.
MIN_FREE_GB=${EDGESYNC_MIN_FREE_GB:-12}
free_kb=$(df -Pk "${CARGO_TARGET_DIR:-${ROOT}}" | awk 'NR == 2 { print $4 }')
[[ ${free_kb} =~ ^[0-9]+$ ]] || fail "could not read the free disk space of ${CARGO_TARGET_DIR:-${ROOT}} from df"
printf 'free disk space: %d GB (need %d GB: EDGESYNC_MIN_FREE_GB)\n' "$((free_kb / 1024 / 1024))" "${MIN_FREE_GB}"
((free_kb >= MIN_FREE_GB * 1024 * 1024)) \
    || fail "only $((free_kb / 1024 / 1024)) GB free where the build goes; the suite needs ${MIN_FREE_GB} GB (set EDGESYNC_MIN_FREE_GB to change)"
# System packages (apt), rustfmt + clippy, the aarch64 target.
bash "${ROOT}/scripts/setup-debian.sh"
cargo --version
rustc --version
# Python venv with pymodbus + pyserial, and socat: the Modbus interop and RTU tests.
bash "${ROOT}/scripts/setup-python.sh"
export EDGESYNC_PYTHON="${ROOT}/.venv/bin/python"
end_step

# ---------------------------------------------------------------------------------------------
# 2-4. Static checks and the test suite (host target).
# ---------------------------------------------------------------------------------------------
begin_step fmt "cargo fmt --all --check"
cargo fmt --all --check
end_step

begin_step clippy "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
end_step

TEST_TIMEOUT_S=${EDGESYNC_TEST_TIMEOUT_S:-1200}
begin_step test "cargo test --workspace --locked --no-fail-fast (time limit ${TEST_TIMEOUT_S} s)"
# timeout signals its whole process group, so hung test processes die with cargo.
timeout --kill-after=30 "${TEST_TIMEOUT_S}" cargo test --workspace --locked --no-fail-fast \
    || { status=$?; [[ ${status} -ne 124 ]] || printf '\ntest.sh: the test suite ran over %s s\n' "${TEST_TIMEOUT_S}" >&2; exit "${status}"; }
end_step

# ---------------------------------------------------------------------------------------------
# 5. Release cross-build of the edge agent for aarch64 (linker and C compiler for ring are
#    set in .cargo/config.toml).
# ---------------------------------------------------------------------------------------------
begin_step cross-build "cargo build --release --locked --target ${CROSS_TARGET} -p ${AGENT_PACKAGE} --bin ${AGENT_BIN}"
cargo build --release --locked --target "${CROSS_TARGET}" -p "${AGENT_PACKAGE}" --bin "${AGENT_BIN}"

# Honour CARGO_TARGET_DIR / build.target-dir by asking cargo where the target directory is.
target_dir=$(cargo metadata --format-version 1 --no-deps --locked \
    | grep -o '"target_directory":"[^"]*"' | head -n 1 | cut -d'"' -f4)
[[ -n ${target_dir} ]] || fail "could not read target_directory from cargo metadata"
agent="${target_dir}/${CROSS_TARGET}/release/${AGENT_BIN}"
[[ -f ${agent} ]] || fail "cross-built agent not found at ${agent}"

printf '\n--- %s\n' "${agent}"
ls -l "${agent}"
du -h "${agent}"
file "${agent}"

# ELF header: magic 7f 45 4c 46, EI_CLASS (byte 4) = 2 (64-bit), EI_DATA (byte 5) = 1 (little
# endian), e_machine (bytes 18-19, little endian) = 0xb7 = 183 = EM_AARCH64.
read -r -a magic <<<"$(od -A n -t x1 -N 4 "${agent}")"
class=$(od -A n -t u1 -j 4 -N 1 "${agent}" | tr -d ' ')
data=$(od -A n -t u1 -j 5 -N 1 "${agent}" | tr -d ' ')
machine=$(od -A n -t u2 --endian=little -j 18 -N 2 "${agent}" | tr -d ' ')
[[ ${magic[*]} == "7f 45 4c 46" ]] || fail "${agent} is not an ELF file (magic: ${magic[*]})"
[[ ${class} == 2 && ${data} == 1 ]] || fail "${agent} is not a 64-bit little-endian ELF (class ${class}, data ${data})"
[[ ${machine} == 183 ]] || fail "${agent} is not an aarch64 binary (e_machine ${machine}, expected 183)"
file -b "${agent}" | grep -q 'ARM aarch64' || fail "file(1) does not report ARM aarch64 for ${agent}"
printf 'ok: %s is a 64-bit little-endian aarch64 ELF of %s bytes\n' "${agent}" "$(stat -c %s "${agent}")"
end_step

# ---------------------------------------------------------------------------------------------
# 6. Fuzzing smoke run: builds every target of fuzz/ (cargo-fuzz, libFuzzer + ASan on the stable
#    toolchain) and runs each briefly; a crash fails the run (scripts/fuzz-smoke.sh).
# ---------------------------------------------------------------------------------------------
begin_step fuzz "scripts/fuzz-smoke.sh (each target ${FUZZ_SECONDS:-15} s)"
FUZZ_SECONDS="${FUZZ_SECONDS:-15}" bash "${ROOT}/scripts/fuzz-smoke.sh"
end_step
