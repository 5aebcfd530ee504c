//! XPMEM-style exporter with a remote consumer.
