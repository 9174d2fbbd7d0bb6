//! peercall daemon and CLI.
mod config;
mod contact;
mod store;
fn main() {}
