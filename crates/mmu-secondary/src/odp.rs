//! On-demand-paging memory region (registration cache).
