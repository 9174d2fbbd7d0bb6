//! peercall peercall (placeholder until its module lands).
fn main() {}
