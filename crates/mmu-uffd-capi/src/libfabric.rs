//! The libfabric import monitor (placeholder: filled in on the `libfabric` branch).
