//! GRU / SVA-style secondary TLB over the primary's own tables.
