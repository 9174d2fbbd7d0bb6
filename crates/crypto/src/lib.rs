//! peercall crypto (placeholder until its module lands).
