//! HMM mirror (Linux's dmirror).
