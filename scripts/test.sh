#!/usr/bin/env bash
# Runs every test of the workspace: formatting, clippy, unit + integration + doc tests,
# and the loom models. Everything it needs comes with the Rust toolchain and crates.io;
# missing rustfmt/clippy components are added with rustup, and a missing C compiler or
# pkg-config (for the C API tests of mmu-uffd-capi), strace or python3 (for the replay of
# real programs' traces) with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
  if ! cargo "$1" --version >/dev/null 2>&1; then
    echo "cargo $1 is missing; trying: rustup component add $2" >&2
    rustup component add "$2"
  fi
}
need fmt rustfmt
need clippy clippy

# The C API tests (crates/mmu-uffd-capi/tests/c_api.rs) compile C programs with cc and
# link one through pkg-config.
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ((${#missing[@]})); then
  echo "missing C tools; trying: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The libfabric tests (crates/mmu-uffd-capi/tests/libfabric.rs) need libfabric's headers
# and library; without them they print SKIPPED.
if ! dpkg -s libfabric-dev >/dev/null 2>&1; then
  echo "libfabric-dev is missing; trying: apt-get install libfabric-dev" >&2
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfabric-dev >/dev/null; } ||
    echo "libfabric-dev cannot be installed: the libfabric tests will be SKIPPED" >&2
fi

# `mmn replay` of real programs (crates/mmn/tests/strace_replay.rs) records a Python
# startup, a C compiler run and a threaded C program with strace; without strace (or
# python3) those tests print SKIPPED.
replay_missing=()
command -v strace >/dev/null 2>&1 || replay_missing+=(strace)
command -v python3 >/dev/null 2>&1 || replay_missing+=(python3-minimal)
if ((${#replay_missing[@]})); then
  echo "missing for the strace replay tests; trying: apt-get install ${replay_missing[*]}" >&2
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${replay_missing[@]}" >/dev/null; } ||
    echo "${replay_missing[*]} cannot be installed: the strace replay tests will be SKIPPED" >&2
fi

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc (warnings are errors: broken links, missing docs)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "cargo test (unit, integration, doc tests)"
cargo test --workspace

step "core tests again with symmetric (fence) barriers instead of membarrier"
MMU_NOTIFIER_SYMMETRIC_BARRIERS=1 cargo test -p mmu-notifier \
  --test rules --test srcu_stress --test interval --test interval_props

step "loom models (RUSTFLAGS=--cfg loom)"
# A separate target dir keeps the loom build from invalidating the normal one. The search
# is bounded to 4 preemptions per execution (about 20 s here); set
# LOOM_MAX_PREEMPTIONS to search deeper (unbounded, the list models take tens of minutes).
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-4}"
RUSTFLAGS="--cfg loom" cargo test -p mmu-notifier --release --target-dir target/loom \
  --test loom_srcu --test loom_core --test loom_interval
RUSTFLAGS="--cfg loom" cargo test -p mmu-uffd --release --target-dir target/loom --lib loom_model
