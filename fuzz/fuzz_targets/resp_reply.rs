//! Feeds arbitrary bytes to the Redis client's reply decoder, as a server (or a broken network)
//! could send them, split at an arbitrary point as TCP may split them, in RESP2 and in RESP3.
//! The decoder must never panic, never use more bytes than it was given, and decode a reply the
//! same whether its bytes arrived at once or in two reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::redis::{decode, Protocol};

fuzz_target!(|data: &[u8]| {
    for protocol in [Protocol::Resp2, Protocol::Resp3] {
        let mut whole = vec![];
        let mut at = 0;
        while let Ok(Some((reply, used))) = decode(&data[at..], protocol) {
            assert!(used > 0 && at + used <= data.len());
            whole.push(reply);
            at += used;
        }
        // Split: feed a prefix first, as a short read would.
        if let Some(&split) = data.first() {
            let split = (split as usize).min(data.len());
            if let Ok(None) = decode(&data[..split], protocol) {
                if let Ok(Some((reply, _))) = decode(data, protocol) {
                    assert_eq!(Some(&reply), whole.first());
                }
            }
        }
    }
});
