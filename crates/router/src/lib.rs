//! peercall router (placeholder until its module lands).
