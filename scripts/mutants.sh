#!/usr/bin/env bash
# Mutation testing of the protocol code with cargo-mutants: every mutant (an operator
# flipped, a function body replaced by a default value, a match arm or guard changed) must
# make a test fail. Not part of scripts/test.sh: one run takes hours on a 2-core machine.
# The recorded result and the reasons for each surviving mutant are in docs/mutants.md.
#
#   scripts/mutants.sh [notifier|core|uffd|itree|all] [OUT_DIR] [-- extra cargo-mutants args]
#
#   notifier  crates/mmu-notifier/src, except the interval tree (itree.rs)   (default)
#   core      the interval protocol's core functions only (sequence count, deferred
#             changes, removal, the subscriber's answer): the short run, about an hour
#   uffd      crates/mmu-uffd/src/{monitor,applier,reader,queue,gate}.rs
#   itree     crates/mmu-notifier/src/itree.rs
#   rest      what `core` and the run of list/range/subscriptions/locked left out: the
#             other functions of interval/mod.rs, srcu.rs, srcu/barrier.rs, sync.rs
#   cache     crates/mmu-uffd/src/{cache,gate}.rs: the registration cache and event gate
#   all       the three, one after the other
#
# Results go to OUT_DIR/<part>/mutants.out (default OUT_DIR: target/mutants); follow a run
# with `tail -f OUT_DIR/<part>/mutants.out/log` or `cat .../caught.txt .../missed.txt`.
# Extra arguments after `--` go to cargo-mutants (e.g. `-- --file 'crates/*/srcu.rs'`,
# `-- --list`, `-- --shard 1/4`).
#
# It runs one mutant at a time (-j 1) at the lowest priority (nice 19): the machine is
# shared. Each mutant is built in a scratch copy of the tree, so the working tree is never
# modified. Tests run: the package's own unit and integration tests without the doc tests
# (each doc test is a separate compile: they would double the cost of every mutant) and
# without the loom models (they need RUSTFLAGS=--cfg loom, a separate build). mmu-uffd is
# built with its fault-injection feature, as `cargo test --workspace` builds it (mmn turns
# it on): without it the code behind the feature is compiled out and its mutants survive.
set -euo pipefail
cd "$(dirname "$0")/.."

part=notifier
out=target/mutants
if (($#)) && [[ "$1" != "--" ]]; then
  part="$1"
  shift
fi
if (($#)) && [[ "$1" != "--" ]]; then
  out="$1"
  shift
fi
if (($#)) && [[ "$1" == "--" ]]; then
  shift
fi
extra=("$@")

if ! cargo mutants --version >/dev/null 2>&1; then
  echo "cargo-mutants is missing; installing it: cargo install --locked cargo-mutants" >&2
  cargo install --locked cargo-mutants
fi

# Less debug info: faster links for the hundreds of incremental builds (a run-only
# setting, it does not touch the normal target directory).
export CARGO_PROFILE_TEST_DEBUG=0 CARGO_PROFILE_DEV_DEBUG=0
# As the test command does where userfaultfd exists: a mutant that stops the monitor from
# starting must fail the tests, not make them skip.
if [[ $(id -u) == 0 && -e /proc/sys/vm/unprivileged_userfaultfd ]]; then
  export MMU_UFFD_REQUIRE=1
fi

# run NAME CARGO-MUTANTS-ARGS... -- CARGO-TEST-ARGS...
run() {
  local name="$1"
  shift
  local margs=()
  while (($#)) && [[ "$1" != "--" ]]; do
    margs+=("$1")
    shift
  done
  (($#)) && shift
  mkdir -p "$out/$name"
  echo "==> cargo mutants: $name -> $out/$name/mutants.out" >&2
  # Exit status 2 means "some mutants were missed", 3 "some timed out": still a result.
  local rc=0
  nice -n 19 cargo mutants --jobs 1 --no-shuffle --output "$out/$name" \
    "${margs[@]}" "${extra[@]}" -- "$@" ||
    rc=$?
  case $rc in
  0 | 2 | 3) ;;
  *)
    echo "cargo mutants failed for $name (exit $rc)" >&2
    return "$rc"
    ;;
  esac
  local f n
  for f in caught missed timeout unviable; do
    n=0
    [[ -f "$out/$name/mutants.out/$f.txt" ]] && n=$(wc -l <"$out/$name/mutants.out/$f.txt")
    printf '%s %-9s %s\n' "$name" "$f" "$n"
  done
}

# A hanging mutant (a lock that is never released, a sequence that never becomes even)
# is cut off after the timeout (cargo-mutants reports it as "timeout": detected, but by a
# hang rather than a failed assertion). The timeouts are about 5 times the baseline test
# time measured on a loaded 2-core machine (mmu-uffd's: 3 times its 19-30 s); each hang
# costs the whole timeout.
notifier() {
  run notifier --package mmu-notifier \
    --file 'crates/mmu-notifier/src/**/*.rs' --exclude 'crates/mmu-notifier/src/itree.rs' \
    --timeout 30 --build-timeout 900 \
    -- --lib --test interval --test interval_locked --test interval_props --test rules \
    --test srcu_stress --test mutants_protocol --test mutants_api --test memory --test leak
}

# The functions of the collision-retry protocol (interval/mod.rs), by name.
CORE_RE='interval/mod\.rs:.* in (last_of|ItreeState::(frozen|pending)|answered|inv_start|inv_end|apply_deferred|insert_locked|update_locked|remove_locked|range_locked|Handle::read_begin|remove_node|split_node|Subscriptions::release_intervals)$|interval/mod\.rs:.*replace (answered|inv_start|inv_end|apply_deferred|insert_locked|update_locked|remove_locked|range_locked|Handle::read_begin|remove_node|split_node|ItreeState::(frozen|pending)|last_of|Subscriptions::release_intervals)\b'
core() {
  run core --package mmu-notifier --file 'crates/mmu-notifier/src/interval/mod.rs' \
    --re "$CORE_RE" --timeout 40 --build-timeout 900 \
    -- --test interval --test interval_locked --test interval_props --test mutants_protocol
}

rest() {
  run rest --package mmu-notifier \
    --file 'crates/mmu-notifier/src/interval/mod.rs' --file 'crates/mmu-notifier/src/srcu.rs' \
    --file 'crates/mmu-notifier/src/srcu/barrier.rs' --file 'crates/mmu-notifier/src/sync.rs' \
    --exclude-re "$CORE_RE" --timeout 30 --build-timeout 900 \
    -- --lib --test interval --test interval_locked --test interval_props --test rules \
    --test srcu_stress --test mutants_protocol --test mutants_api --test memory --test leak
}

cache() {
  run cache --package mmu-uffd \
    --file 'crates/mmu-uffd/src/cache.rs' --file 'crates/mmu-uffd/src/gate.rs' \
    --exclude-re "$TEST_CODE_RE" \
    --features fault-injection --timeout 60 --build-timeout 900 \
    -- --lib --tests
}

itree() {
  run itree --package mmu-notifier --file 'crates/mmu-notifier/src/itree.rs' \
    --timeout 30 --build-timeout 900 \
    -- --lib --test itree_props --test interval --test interval_props
}

# The loom models in applier.rs and the unit tests' helpers are test code: a mutant of a
# model's own checks makes the model weaker, not the library wrong (and the models run
# only in the test command's loom step, not here).
TEST_CODE_RE='loom_model::|tests::'
uffd() {
  run uffd --package mmu-uffd \
    --file 'crates/mmu-uffd/src/monitor.rs' --file 'crates/mmu-uffd/src/applier.rs' \
    --file 'crates/mmu-uffd/src/reader.rs' --file 'crates/mmu-uffd/src/queue.rs' \
    --file 'crates/mmu-uffd/src/gate.rs' --exclude-re "$TEST_CODE_RE" \
    --features fault-injection --timeout 60 --build-timeout 900 \
    -- --lib --tests
}

case "$part" in
notifier) notifier ;;
core) core ;;
uffd) uffd ;;
itree) itree ;;
rest) rest ;;
cache) cache ;;
all)
  notifier
  uffd
  itree
  ;;
*)
  echo "usage: $0 [notifier|core|uffd|itree|rest|cache|all] [OUT_DIR] [-- cargo-mutants args]" >&2
  exit 64
  ;;
esac
