//! Feeds arbitrary bytes to the HTTP response reader, as a server (or a broken network) could
//! send them: the head parser and, after a head, the chunked body decoder. Neither may panic or
//! claim more bytes than it was given, and a chunked body decoded from a prefix must be the
//! same as from the whole input (a short read never yields a different body).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::http::response::{decode_chunked, parse_head};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(head)) = parse_head(data) {
        assert!(head.len <= data.len());
    }
    if let Ok(Some((body, used))) = decode_chunked(data) {
        assert!(used <= data.len() && body.len() <= used);
        for cut in [used / 2, used.saturating_sub(1)] {
            if let Ok(Some((prefix_body, prefix_used))) = decode_chunked(&data[..cut]) {
                panic!("a prefix of {cut} bytes decoded to {prefix_body:?} ({prefix_used} used)");
            }
        }
    }
});
