//! peercall sim (placeholder until its module lands).
