#!/usr/bin/env bash
# Builds every fuzz target of fuzz/ (cargo-fuzz + libFuzzer, AddressSanitizer, debug assertions
# and overflow checks) and runs each one briefly. Exits non-zero when a target does not build
# or finds a crash (the crashing input is left in fuzz/artifacts/<target>/ and printed).
#
# Self-contained: installs a C++ compiler (libFuzzer is C++) through apt if there is none, and
# cargo-fuzz from crates.io into a cache directory if it is missing. Works on the STABLE
# toolchain: cargo-fuzz passes nightly-only flags (-Zsanitizer=address, -Cpasses=sancov-module,
# ...), which stable rustc accepts when RUSTC_BOOTSTRAP=1 is set. That variable is set for the
# cargo-fuzz commands of this script only, never for the product build.
#
# Usage: bash scripts/fuzz-smoke.sh [target...]       (default: every target, `cargo fuzz list`)
# Environment:
#   FUZZ_SECONDS      seconds per target (default 25)
#   FUZZ_TOOLS_DIR    where cargo-fuzz is installed (default ~/.cache/edgesync-tools)
#   FUZZ_JOBS         cargo build jobs (default: cargo's)
set -euo pipefail

die() { printf '\nfuzz-smoke.sh: error: %s\n' "$*" >&2; exit 1; }
banner() { printf '\n==> fuzz: %s\n' "$*"; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -f fuzz/Cargo.toml ]] || die "fuzz/Cargo.toml not found (run from the edgesync repository)"

SECONDS_PER_TARGET=${FUZZ_SECONDS:-25}
TOOLS_DIR=${FUZZ_TOOLS_DIR:-${HOME}/.cache/edgesync-tools}
CARGO_FUZZ_VERSION=0.13.2
export PATH="${TOOLS_DIR}/bin:${HOME}/.cargo/bin:${PATH}"

as_root() {
    if [[ ${EUID} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -- "$@"
    else
        die "not root and no sudo: install a C++ compiler (Debian: g++) and re-run"
    fi
}

# libfuzzer-sys compiles libFuzzer (C++) with the cc crate.
if ! command -v c++ >/dev/null 2>&1; then
    banner "installing g++ (libFuzzer is C++)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends g++
fi

if ! cargo fuzz --version 2>/dev/null | grep -qF "${CARGO_FUZZ_VERSION}"; then
    banner "installing cargo-fuzz ${CARGO_FUZZ_VERSION} into ${TOOLS_DIR}"
    cargo install cargo-fuzz --version "${CARGO_FUZZ_VERSION}" --locked --root "${TOOLS_DIR}"
fi

export RUSTC_BOOTSTRAP=1
build_flags=(--fuzz-dir fuzz)
[[ -n ${FUZZ_JOBS:-} ]] && build_flags+=(--jobs "${FUZZ_JOBS}")

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
[[ ${#targets[@]} -gt 0 ]] || die "no fuzz targets found"

banner "building ${targets[*]} (stable rustc with RUSTC_BOOTSTRAP=1, ASan, debug assertions)"
for t in "${targets[@]}"; do
    cargo fuzz build "${build_flags[@]}" "${t}"
done

failed=()
for t in "${targets[@]}"; do
    banner "running ${t} for ${SECONDS_PER_TARGET} s"
    corpus="fuzz/corpus/${t}"
    mkdir -p "${corpus}"
    extra=()
    [[ -d "fuzz/seeds/${t}" ]] && extra+=("fuzz/seeds/${t}")
    opts=(-max_total_time="${SECONDS_PER_TARGET}" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1)
    [[ -f "fuzz/dict/${t}.dict" ]] && opts+=(-dict="fuzz/dict/${t}.dict")
    if ! cargo fuzz run "${build_flags[@]}" "${t}" "${corpus}" "${extra[@]}" -- "${opts[@]}"; then
        failed+=("${t}")
        for a in fuzz/artifacts/"${t}"/*; do
            [[ -f ${a} ]] || continue
            printf 'crashing input: %s\n' "${a}"
            printf 'reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run %s %s\n' "${t}" "${a}"
        done
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    die "fuzz targets failed: ${failed[*]}"
fi
banner "ok: ${targets[*]} built and ran ${SECONDS_PER_TARGET} s each without a crash"
