//! `sluice enrich --checkpoint-dir`: the file source and file sink that make a run resumable
//! and exactly-once, the codecs for what the stage holds in flight, and the completed marker.
//!
//! Owns: the meaning of a checkpoint's source and sink positions for enrich. Invariants:
//! - the source position is the byte offset just after the last line handed to the stage (or
//!   skipped), with the number of lines before it, so line numbers continue on resume, and the
//!   CRC-32 of the bytes before it, so a resume refuses an input that was changed;
//! - the sink position is the output file's length after a flush and an fsync, and each
//!   dead-letter file's length likewise (the sink's side outputs); on resume each file is cut
//!   back to it, so what was written after the checkpoint is written again exactly once by the
//!   re-issued and re-read records;
//! - a run that finished leaves `completed` in the directory (written durably last), and a
//!   re-run with that marker does nothing.

use super::files::FILE_BUFFER;
use super::record::{to_json, BadRecord, Fields, Line, Record};
use super::{EnrichError, Enriched, Lookup};
use crate::checkpoint::{Codec, RestoreInfo};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The marker a finished run leaves in its checkpoint directory.
pub fn completed_marker(dir: &Path) -> PathBuf {
    dir.join("completed")
}

/// Writes the completed marker durably (see `replace_durably`).
pub(crate) fn mark_completed(dir: &Path, summary_json: &str) -> Result<(), EnrichError> {
    crate::checkpoint::replace_durably(dir, "completed", summary_json.as_bytes())
        .map_err(|e| EnrichError::dir(dir, format!("completed marker: {e}")))
}

/// A file source's digest of its first bytes: their CRC-32, with bit 32 set to say that there
/// is one (a checkpoint without it, 0, is not checked).
pub(crate) fn source_digest(hasher: &crc32fast::Hasher) -> u64 {
    (1 << 32) | u64::from(hasher.clone().finalize())
}

/// An input opened where a run starts reading it.
pub(crate) struct Source {
    pub reader: BufReader<File>,
    pub offset: u64,
    pub lines: u64,
    /// The CRC-32 of everything before `offset`, to go on hashing from.
    pub hasher: crc32fast::Hasher,
}

/// Opens the input at the restored position (or its start), after checking that the bytes
/// before it are those the checkpoint consumed (their CRC-32).
pub(crate) fn open_source(
    path: &Path,
    restored: Option<&RestoreInfo>,
) -> Result<Source, EnrichError> {
    let name = format!("input {}", path.display());
    let error = |e: std::io::Error| EnrichError::file(name.clone(), e);
    let mut file = File::open(path).map_err(error)?;
    let (offset, lines) = restored.map_or((0, 0), |r| (r.source.offset, r.source.records));
    let id = restored.map_or(0, |r| r.checkpoint_id);
    let len = file.metadata().map_err(error)?.len();
    if offset > len {
        return Err(EnrichError::file(
            name,
            format!(
                "{len} bytes but checkpoint {id} resumes at byte {offset}: the input changed \
                 since the checkpoint; restore it, or remove the checkpoint directory"
            ),
        ));
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut prefix = (&mut file).take(offset);
    let mut chunk = vec![0u8; FILE_BUFFER];
    loop {
        let n = prefix.read(&mut chunk).map_err(error)?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
    }
    let expected = restored.map_or(0, |r| r.source.digest);
    if expected != 0 && source_digest(&hasher) != expected {
        return Err(EnrichError::file(
            name,
            format!(
                "its first {offset} bytes are not those checkpoint {id} consumed (their CRC-32 \
                 differs): the input was changed since; restore it, or remove the checkpoint \
                 directory to start afresh"
            ),
        ));
    }
    file.seek(SeekFrom::Start(offset)).map_err(error)?;
    Ok(Source {
        reader: BufReader::with_capacity(FILE_BUFFER, file),
        offset,
        lines,
        hasher,
    })
}

/// Opens a file the sink appends to: cut back to `committed` (what a restored checkpoint
/// committed) or emptied for a fresh run. `what` names it in errors.
pub(crate) fn open_appending(
    path: &Path,
    committed: Option<(u64, u64)>,
    what: &str,
) -> Result<File, EnrichError> {
    let name = format!("{what} {}", path.display());
    let error = |e: std::io::Error| EnrichError::file(name.clone(), e);
    let Some((checkpoint_id, position)) = committed else {
        return File::create(path).map_err(error);
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(position == 0)
        .truncate(false)
        .open(path)
        .map_err(error)?;
    let len = file.metadata().map_err(error)?.len();
    if len < position {
        return Err(EnrichError::file(
            name,
            format!(
                "{len} bytes but checkpoint {checkpoint_id} committed {position} bytes: it was \
                 changed or truncated since; restore it, or remove the checkpoint directory"
            ),
        ));
    }
    file.set_len(position).map_err(error)?;
    file.sync_all().map_err(error)?;
    file.seek(SeekFrom::End(0)).map_err(error)?;
    Ok(file)
}

fn encode_record(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.line.to_le_bytes());
    put_str(out, &r.key);
    out.extend_from_slice(to_json(&r.fields).as_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Reads a `put_str` string at `at`; returns it and the offset after it.
fn get_str(b: &[u8], at: usize) -> Result<(String, usize), String> {
    let short = || format!("{} bytes: too short", b.len());
    let len = u32::from_le_bytes(b.get(at..at + 4).ok_or_else(short)?.try_into().expect("4"));
    let end = at + 4 + len as usize;
    let s = std::str::from_utf8(b.get(at + 4..end).ok_or_else(short)?)
        .map_err(|e| format!("not UTF-8: {e}"))?;
    Ok((s.to_string(), end))
}

const RECORD: u8 = 0;
const BAD: u8 = 1;

/// Bytes: tag (u8), line (u64 LE), then for a record its key (u32 LE length, bytes) and its
/// fields as JSON, for a bad record its reason and its text (each u32 LE length, bytes).
fn encode_line(line: &Line, out: &mut Vec<u8>) {
    match line {
        Line::Record(r) => {
            out.push(RECORD);
            encode_record(r, out);
        }
        Line::Bad(b) => {
            out.push(BAD);
            out.extend_from_slice(&b.line.to_le_bytes());
            put_str(out, &b.reason);
            put_str(out, &b.text);
        }
    }
}

fn decode_line(b: &[u8]) -> Result<Line, String> {
    let short = || format!("{} bytes: too short for a line", b.len());
    let tag = *b.first().ok_or_else(short)?;
    let line = u64::from_le_bytes(b.get(1..9).ok_or_else(short)?.try_into().expect("8"));
    match tag {
        RECORD => {
            let (key, end) = get_str(b, 9)?;
            let text = std::str::from_utf8(&b[end..]).map_err(|e| format!("fields: {e}"))?;
            let fields = Fields::parse(text).map_err(|e| format!("fields: {e}"))?;
            Ok(Line::Record(Record {
                line,
                key,
                fields,
                held: Default::default(),
            }))
        }
        BAD => {
            let (reason, end) = get_str(b, 9)?;
            let (text, _) = get_str(b, end)?;
            Ok(Line::Bad(BadRecord {
                line,
                reason,
                text,
                held: Default::default(),
            }))
        }
        other => Err(format!("unknown line tag {other}")),
    }
}

/// The stage's input in snapshots.
pub(crate) fn line_codec() -> Codec<Arc<Line>> {
    Codec::new(
        |l: &Arc<Line>| {
            let mut out = Vec::with_capacity(64);
            encode_line(l, &mut out);
            out
        },
        |b| decode_line(b).map(Arc::new),
    )
}

const FOUND: u8 = 0;
const MISSING: u8 = 1;
const TIMED_OUT: u8 = 2;
const FAILED: u8 = 3;
const NOT_NEEDED: u8 = 4;

/// The stage's output in the merge's snapshot: tag (u8), line length (u32 LE), line, then the
/// found value or the error text.
pub(crate) fn enriched_codec() -> Codec<Enriched> {
    Codec::new(
        |e: &Enriched| {
            let mut line = Vec::with_capacity(64);
            encode_line(&e.line, &mut line);
            let (tag, payload): (u8, &[u8]) = match &e.lookup {
                Lookup::Found(v) => (FOUND, v),
                Lookup::Missing => (MISSING, &[]),
                Lookup::TimedOut => (TIMED_OUT, &[]),
                Lookup::Failed(why) => (FAILED, why.as_bytes()),
                Lookup::NotNeeded => (NOT_NEEDED, &[]),
            };
            let mut out = Vec::with_capacity(5 + line.len() + payload.len());
            out.push(tag);
            out.extend_from_slice(&(line.len() as u32).to_le_bytes());
            out.extend_from_slice(&line);
            out.extend_from_slice(payload);
            out
        },
        |b| {
            let short = || format!("{} bytes: too short for an enriched record", b.len());
            let tag = *b.first().ok_or_else(short)?;
            let len = u32::from_le_bytes(b.get(1..5).ok_or_else(short)?.try_into().expect("4"));
            let end = 5 + len as usize;
            let line = decode_line(b.get(5..end).ok_or_else(short)?)?;
            let payload = &b[end..];
            let lookup = match tag {
                FOUND => Lookup::Found(bytes::Bytes::copy_from_slice(payload)),
                MISSING => Lookup::Missing,
                TIMED_OUT => Lookup::TimedOut,
                FAILED => Lookup::Failed(String::from_utf8_lossy(payload).into_owned()),
                NOT_NEEDED => Lookup::NotNeeded,
                other => return Err(format!("unknown lookup tag {other}")),
            };
            Ok(Enriched {
                line: Arc::new(line),
                lookup,
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Line {
        let fields = Fields::parse(r#"{"user":"u1","n":[1,2,{"x":null}],"big":1e400}"#).unwrap();
        Line::Record(Record {
            line: 42,
            key: "user:ü1".into(),
            fields,
            held: Default::default(),
        })
    }

    fn bad() -> Line {
        Line::Bad(BadRecord {
            line: 7,
            reason: "not valid JSON".into(),
            text: "{\"a\":".into(),
            held: Default::default(),
        })
    }

    fn json_of(line: &Line) -> String {
        match line {
            Line::Record(r) => format!("{} {} {}", r.line, r.key, to_json(&r.fields)),
            Line::Bad(b) => format!("{b:?}"),
        }
    }

    #[test]
    fn codecs_round_trip() {
        let codec = line_codec();
        for line in [record(), bad()] {
            let back = codec.decode(&codec.encode(&Arc::new(line))).unwrap();
            assert!([json_of(&record()), json_of(&bad())].contains(&json_of(&back)));
        }
        let back = codec.decode(&codec.encode(&Arc::new(record()))).unwrap();
        assert_eq!(json_of(&back), json_of(&record()));
        let codec = enriched_codec();
        for lookup in [
            Lookup::Found(vec![0, 255, b'{'].into()),
            Lookup::Missing,
            Lookup::TimedOut,
            Lookup::Failed("connection reset".into()),
            Lookup::NotNeeded,
        ] {
            let e = Enriched {
                line: Arc::new(record()),
                lookup: lookup.clone(),
            };
            let back = codec.decode(&codec.encode(&e)).unwrap();
            assert_eq!(back.lookup, lookup);
            assert_eq!(json_of(&back.line), json_of(&record()));
        }
        assert!(codec.decode(&[9, 0]).is_err());
        assert!(line_codec().decode(&[1, 2, 3]).is_err());
    }
}
