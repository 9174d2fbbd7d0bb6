//! Outer packet parser: never panics, and whatever parses re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peercall_wire::{Packet, classify};

fuzz_target!(|data: &[u8]| {
    let _ = classify(data);
    if let Ok(packet) = Packet::parse(data) {
        let mut out = vec![0u8; data.len()];
        let n = packet.encode(&mut out).expect("a parsed packet encodes");
        assert_eq!(&out[..n], data);
    }
});
