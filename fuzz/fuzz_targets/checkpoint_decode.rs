//! Feeds arbitrary bytes to the checkpoint decoders (shard snapshot, merge snapshot, manifest),
//! as a torn write or a bad disk could leave them. They must return an error or a value, never
//! panic or read out of bounds; a snapshot that decodes must re-encode to bytes that decode to
//! it again. Random bytes rarely pass the CRC, so half of the inputs get a valid header
//! (magic, version, length, CRC-32) around the fuzzed payload: that reaches rkyv's validation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::checkpoint::{Manifest, MergeSnapshot, ShardSnapshot, SNAPSHOT_VERSION};
use std::path::Path;

fn framed(magic: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz");
    let (shard_bytes, merge_bytes) = match data.split_first() {
        Some((selector, payload)) if selector & 1 == 1 => {
            (framed(b"SLUICESN", payload), framed(b"SLUICEMG", payload))
        }
        _ => (data.to_vec(), data.to_vec()),
    };
    if let Ok(snapshot) = ShardSnapshot::decode(&shard_bytes, path) {
        let again = ShardSnapshot::decode(&snapshot.encode().unwrap(), path).unwrap();
        assert_eq!(again, snapshot);
    }
    if let Ok(snapshot) = MergeSnapshot::decode(&merge_bytes, path) {
        let again = MergeSnapshot::decode(&snapshot.encode().unwrap(), path).unwrap();
        assert_eq!(again, snapshot);
    }
    let _ = Manifest::decode(data, path);
});
