//! Inner frame parser: never panics, and whatever parses re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peercall_wire::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::parse(data) {
        let mut out = vec![0u8; data.len()];
        let n = frame.encode(&mut out).expect("a parsed frame encodes");
        assert_eq!(&out[..n], data);
    }
});
