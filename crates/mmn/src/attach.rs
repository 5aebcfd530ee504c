//! The secondaries `mmn torture` can attach, by name.

use std::sync::Arc;

use mmu_notifier::OwnerToken;
use mmu_secondary::hmm::HmmMirror;
use mmu_secondary::kvm::Kvm;
use mmu_secondary::odp::OdpRegion;
use mmu_secondary::sva::SvaTlb;
use mmu_secondary::xpmem::Xpmem;
use mmu_secondary::SecondaryMmu;
use mmu_sim::{AddressSpace, PAGE_SIZE};

/// Every secondary, the default of `--secondaries`.
pub const ALL: &str = "kvm,sva,hmm,xpmem,odp";

/// The HMM mirror's device token (its own migrations carry it).
pub const HMM_OWNER: OwnerToken = OwnerToken(0xD1);

/// Attaches the secondary `name` to `mm`, covering `[start, start + len)`.
pub fn attach(
    name: &str,
    mm: &Arc<AddressSpace>,
    start: u64,
    len: u64,
) -> Result<Arc<dyn SecondaryMmu>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("attaching {name}: {e}");
    Ok(match name {
        "kvm" => {
            let kvm = Kvm::new(mm).map_err(|e| fail(&e))?;
            // One memslot: guest frame 0 at the region's start.
            kvm.add_memslot(0, len / PAGE_SIZE, start)
                .map_err(|e| fail(&e))?;
            kvm
        }
        "sva" => SvaTlb::new(mm).map_err(|e| fail(&e))?,
        "hmm" => HmmMirror::with_range(mm, HMM_OWNER, start, len).map_err(|e| fail(&e))?,
        "xpmem" => {
            let x = Xpmem::new(mm).map_err(|e| fail(&e))?;
            x.export(start, len).map_err(|e| fail(&e))?;
            x
        }
        "odp" => OdpRegion::new(mm, start, len).map_err(|e| fail(&e))?,
        _ => return Err(format!("unknown secondary {name:?}; known: {ALL}")),
    })
}
