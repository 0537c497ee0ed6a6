//! `sluice enrich --checkpoint-dir`: the file source and file sink that make a run resumable
//! and exactly-once, the codecs for what the stage holds in flight, and the completed marker.
//!
//! Owns: the meaning of a checkpoint's source and sink positions for enrich. Invariants:
//! - the source position is the byte offset just after the last line handed to the stage (or
//!   skipped), with the number of lines before it, so line numbers continue on resume;
//! - the sink position is the output file's length after a flush and an fsync; on resume the
//!   file is cut back to it, so output written after the checkpoint is written again exactly
//!   once by the re-issued and re-read records;
//! - a run that finished leaves `completed` in the directory (written durably last), and a
//!   re-run with that marker does nothing.

use super::{Enriched, Lookup, Record};
use crate::checkpoint::{Codec, RestoreInfo};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The marker a finished run leaves in its checkpoint directory.
pub fn completed_marker(dir: &Path) -> PathBuf {
    dir.join("completed")
}

/// Writes the completed marker durably (see `replace_durably`).
pub(crate) fn mark_completed(dir: &Path, summary_json: &str) -> Result<(), String> {
    crate::checkpoint::replace_durably(dir, "completed", summary_json.as_bytes())
        .map_err(|e| format!("completed marker: {e}"))
}

/// Opens the input at the restored position (or its start); returns it with the number of
/// lines before that position.
pub(crate) fn open_source(
    path: &Path,
    restored: Option<&RestoreInfo>,
) -> Result<(BufReader<File>, u64, u64), String> {
    let error = |e: std::io::Error| format!("input {}: {e}", path.display());
    let mut file = File::open(path).map_err(error)?;
    let (offset, lines) = restored.map_or((0, 0), |r| (r.source.offset, r.source.records));
    let len = file.metadata().map_err(error)?.len();
    if offset > len {
        return Err(format!(
            "input {} is {len} bytes but checkpoint {} resumes at byte {offset}: the input \
             changed since the checkpoint; restore it, or remove the checkpoint directory",
            path.display(),
            restored.map_or(0, |r| r.checkpoint_id)
        ));
    }
    file.seek(SeekFrom::Start(offset)).map_err(error)?;
    Ok((BufReader::with_capacity(256 * 1024, file), offset, lines))
}

/// Opens the output: cut back to the restored sink position, or emptied for a fresh run.
pub(crate) fn open_sink(path: &Path, restored: Option<&RestoreInfo>) -> Result<File, String> {
    let error = |e: std::io::Error| format!("output {}: {e}", path.display());
    let Some(r) = restored else {
        return File::create(path).map_err(error);
    };
    let mut file = OpenOptions::new().write(true).open(path).map_err(error)?;
    let len = file.metadata().map_err(error)?.len();
    if len < r.sink_position {
        return Err(format!(
            "output {} is {len} bytes but checkpoint {} committed {} bytes: the output was \
             changed or truncated since; restore it, or remove the checkpoint directory",
            path.display(),
            r.checkpoint_id,
            r.sink_position
        ));
    }
    file.set_len(r.sink_position).map_err(error)?;
    file.sync_all().map_err(error)?;
    file.seek(SeekFrom::End(0)).map_err(error)?;
    Ok(file)
}

/// Bytes: line (u64 LE), key length (u32 LE), key, then the fields as JSON.
fn encode_record(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.line.to_le_bytes());
    out.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
    out.extend_from_slice(r.key.as_bytes());
    serde_json::to_writer(&mut *out, &r.fields).expect("a JSON map serialises");
}

fn decode_record(b: &[u8]) -> Result<Record, String> {
    let short = || format!("{} bytes: too short for a record", b.len());
    let line = u64::from_le_bytes(b.get(0..8).ok_or_else(short)?.try_into().expect("8"));
    let key_len = u32::from_le_bytes(b.get(8..12).ok_or_else(short)?.try_into().expect("4"));
    let key_end = 12 + key_len as usize;
    let key = std::str::from_utf8(b.get(12..key_end).ok_or_else(short)?)
        .map_err(|e| format!("key is not UTF-8: {e}"))?
        .to_string();
    let fields: Map<String, Value> =
        serde_json::from_slice(&b[key_end..]).map_err(|e| format!("fields: {e}"))?;
    Ok(Record { line, key, fields })
}

/// The stage's input in snapshots.
pub(crate) fn record_codec() -> Codec<Arc<Record>> {
    Codec::new(
        |r: &Arc<Record>| {
            let mut out = Vec::with_capacity(64);
            encode_record(r, &mut out);
            out
        },
        |b| decode_record(b).map(Arc::new),
    )
}

const FOUND: u8 = 0;
const MISSING: u8 = 1;
const TIMED_OUT: u8 = 2;
const FAILED: u8 = 3;

/// The stage's output in the merge's snapshot: tag (u8), record length (u32 LE), record,
/// then the found value or the error text.
pub(crate) fn enriched_codec() -> Codec<Enriched> {
    Codec::new(
        |e: &Enriched| {
            let mut record = Vec::with_capacity(64);
            encode_record(&e.record, &mut record);
            let (tag, payload): (u8, &[u8]) = match &e.lookup {
                Lookup::Found(v) => (FOUND, v),
                Lookup::Missing => (MISSING, &[]),
                Lookup::TimedOut => (TIMED_OUT, &[]),
                Lookup::Failed(why) => (FAILED, why.as_bytes()),
            };
            let mut out = Vec::with_capacity(5 + record.len() + payload.len());
            out.push(tag);
            out.extend_from_slice(&(record.len() as u32).to_le_bytes());
            out.extend_from_slice(&record);
            out.extend_from_slice(payload);
            out
        },
        |b| {
            let short = || format!("{} bytes: too short for an enriched record", b.len());
            let tag = *b.first().ok_or_else(short)?;
            let len = u32::from_le_bytes(b.get(1..5).ok_or_else(short)?.try_into().expect("4"));
            let end = 5 + len as usize;
            let record = decode_record(b.get(5..end).ok_or_else(short)?)?;
            let payload = &b[end..];
            let lookup = match tag {
                FOUND => Lookup::Found(payload.to_vec()),
                MISSING => Lookup::Missing,
                TIMED_OUT => Lookup::TimedOut,
                FAILED => Lookup::Failed(String::from_utf8_lossy(payload).into_owned()),
                other => return Err(format!("unknown lookup tag {other}")),
            };
            Ok(Enriched {
                record: Arc::new(record),
                lookup,
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        let fields = serde_json::from_str(r#"{"user":"u1","n":[1,2,{"x":null}]}"#).unwrap();
        Record {
            line: 42,
            key: "user:ü1".into(),
            fields,
        }
    }

    #[test]
    fn codecs_round_trip() {
        let codec = record_codec();
        let r = codec.decode(&codec.encode(&Arc::new(record()))).unwrap();
        assert_eq!((r.line, r.key.as_str()), (42, "user:ü1"));
        assert_eq!(r.fields, record().fields);
        let codec = enriched_codec();
        for lookup in [
            Lookup::Found(vec![0, 255, b'{']),
            Lookup::Missing,
            Lookup::TimedOut,
            Lookup::Failed("connection reset".into()),
        ] {
            let e = Enriched {
                record: Arc::new(record()),
                lookup: lookup.clone(),
            };
            let back = codec.decode(&codec.encode(&e)).unwrap();
            assert_eq!(back.lookup, lookup);
            assert_eq!(back.record.fields, record().fields);
        }
        assert!(codec.decode(&[9, 0]).is_err());
        assert!(record_codec().decode(&[1, 2, 3]).is_err());
    }
}
