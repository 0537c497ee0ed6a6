//! Feeds arbitrary bytes to the checkpoint decoders (shard snapshot and manifest), as a torn
//! write or a bad disk could leave them. They must return an error or a value, never panic or
//! read out of bounds; a snapshot that decodes must re-encode to bytes that decode to it again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::checkpoint::{Manifest, ShardSnapshot};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(snapshot) = ShardSnapshot::decode(data, Path::new("fuzz")) {
        let again = ShardSnapshot::decode(&snapshot.encode().unwrap(), Path::new("fuzz")).unwrap();
        assert_eq!(again, snapshot);
    }
    let _ = Manifest::decode(data, Path::new("fuzz"));
});
