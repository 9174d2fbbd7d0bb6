//! Signed records: verification never panics; whatever verifies re-encodes to the
//! same bytes, and so does whatever body parses (both encodings are canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peercall_crypto::{Record, RecordBody};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = Record::verify(data) {
        assert_eq!(record.to_bytes(), data);
    }
    // Signatures stop almost every input before the body parser, so fuzz the body
    // parser on its own as well.
    if let Ok(body) = RecordBody::decode(data) {
        assert_eq!(body.encode().expect("a parsed body encodes"), data);
    }
});
