//! peercall media (placeholder until its module lands).
