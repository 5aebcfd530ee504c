//! The secondaries `mmn torture` can attach, by name.

use std::sync::Arc;

use mmu_secondary::SecondaryMmu;
use mmu_sim::AddressSpace;

/// Every secondary, the default of `--secondaries`.
pub const ALL: &str = "kvm,sva,hmm,xpmem,odp";

/// Attaches the secondary `name` to `mm`, covering `[start, start + len)`.
pub fn attach(
    name: &str,
    mm: &Arc<AddressSpace>,
    start: u64,
    len: u64,
) -> Result<Arc<dyn SecondaryMmu>, String> {
    let _ = (mm, start, len);
    Err(format!("unknown secondary {name:?}; known: {ALL}"))
}
