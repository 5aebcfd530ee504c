//! KVM-style shadow page table.
