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
# The MSRV check reads `cargo metadata` with jq.
command -v jq >/dev/null 2>&1 || missing+=(jq)
if ((${#missing[@]})); then
  echo "missing tools; trying: apt-get install ${missing[*]}" >&2
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
# Where the kernel has userfaultfd and we are root, the userfaultfd tests must run: a
# monitor that cannot start fails them (MMU_UFFD_REQUIRE) instead of skipping them.
if [[ $(id -u) == 0 && -e /proc/sys/vm/unprivileged_userfaultfd ]]; then
  export MMU_UFFD_REQUIRE=1
  echo "userfaultfd present and running as root: MMU_UFFD_REQUIRE=1 (no monitor test may skip)"
fi
cargo test --workspace

step "MSRV: the lockfile is resolved for rust-version (every dependency built here supports it)"
# The lockfile is resolved by cargo's MSRV-aware resolver (.cargo/config.toml); clippy's
# incompatible_msrv (denied in Cargo.toml) checks this workspace's own use of std. Only
# this toolchain exists here: compiling with the MSRV toolchain itself is not checked.
host="$(rustc -vV | sed -n 's/^host: //p')"
cargo metadata --locked --format-version 1 --filter-platform "$host" | jq -r '
  def v: split(".") | map(tonumber) | (. + [0, 0, 0])[0:3];
  (.packages[] | select(.name == "mmu-notifier") | .rust_version) as $msrv
  | (.resolve.nodes | map(.id)) as $used
  | .packages[]
  | select(.id as $id | $used | index($id))
  | select(.rust_version != null and (.rust_version | v) > ($msrv | v))
  | "\(.name) \(.version) needs Rust \(.rust_version) > rust-version \($msrv)"' >target/msrv-violations.txt
if [[ -s target/msrv-violations.txt ]]; then
  cat target/msrv-violations.txt >&2
  echo "re-resolve with: cargo update (the MSRV-aware resolver picks compatible versions)" >&2
  exit 1
fi

step "cargo package: the publishable crates package and build from their .crate files"
# Verification builds each crate from its packaged sources (the target/package dir is
# reused between runs); then the packaged mmu-notifier runs its doc tests, which include
# the README, from the unpacked .crate (dependencies come from the shared target dir).
# Cargo verifies each crate against the others' .crate files through a temporary local
# registry, unpacked into $CARGO_HOME/registry/src/-<hash>/, and never unpacks over an
# existing copy of the same version: remove those copies of this workspace's crates first,
# or verification would build the sources of an earlier run.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
rm -rf "$cargo_home"/registry/src/-*/mmu-notifier-[0-9]* \
  "$cargo_home"/registry/src/-*/mmu-sim-[0-9]* "$cargo_home"/registry/src/-*/mmu-uffd-[0-9]*
cargo package --allow-dirty --locked -p mmu-notifier -p mmu-sim -p mmu-uffd
core_version="$(cargo metadata --no-deps --format-version 1 |
  jq -r '.packages[] | select(.name == "mmu-notifier") | .version')"
root="$PWD"
pkg_dir="$(mktemp -d)"
tar xzf "target/package/mmu-notifier-$core_version.crate" -C "$pkg_dir"
(cd "$pkg_dir/mmu-notifier-$core_version" && cargo test --doc --locked --target-dir "$root/target")
rm -rf "$pkg_dir"

step "core tests again with symmetric (fence) barriers instead of membarrier"
MMU_NOTIFIER_SYMMETRIC_BARRIERS=1 cargo test -p mmu-notifier \
  --test rules --test srcu_stress --test interval --test interval_props
# `=0` asks for nothing: the process picks membarrier where the kernel has it.
MMU_NOTIFIER_SYMMETRIC_BARRIERS=0 cargo test -p mmu-notifier --test srcu_stress \
  the_barrier_flavour_is_the_one_the_environment_asks_for

step "portability: the core's fence-only barriers (targets without membarrier), on Linux"
# Only the crate under test gets the cfg (`cargo rustc`), so no dependency is rebuilt: the
# core's unit tests built with the implementation that other targets compile.
fence_only_tests="$(cargo rustc -p mmu-notifier --lib --profile test \
  --message-format=json-render-diagnostics -- --cfg mmu_notifier_fence_only |
  jq -r 'select(.reason == "compiler-artifact" and .target.name == "mmu_notifier"
    and .executable != null) | .executable')"
"$fence_only_tests"

step "portability: the Linux-only crates refuse other targets with a clear message"
for crate in mmu-uffd mmu-uffd-capi; do
  if out="$(cargo rustc -p "$crate" --lib -- --cfg mmu_uffd_pretend_not_linux 2>&1)"; then
    echo "$crate built for a pretended non-Linux target" >&2
    exit 1
  fi
  if ! grep -q "$crate supports Linux only" <<<"$out"; then
    printf '%s\n' "$out" >&2
    echo "$crate failed off Linux without its compile_error! message" >&2
    exit 1
  fi
  echo "$crate: refuses non-Linux targets with its message"
done

step "loom models (RUSTFLAGS=--cfg loom)"
# A separate target dir keeps the loom build from invalidating the normal one. The search
# is bounded to 4 preemptions per execution (about 20 s here); set
# LOOM_MAX_PREEMPTIONS to search deeper (unbounded, the list models take tens of minutes).
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-4}"
RUSTFLAGS="--cfg loom" cargo test -p mmu-notifier --release --target-dir target/loom \
  --test loom_srcu --test loom_core --test loom_interval
RUSTFLAGS="--cfg loom" cargo test -p mmu-uffd --release --target-dir target/loom --lib loom_model
