//! peercall overlay (placeholder until its module lands).
