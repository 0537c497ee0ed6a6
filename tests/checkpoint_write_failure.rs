//! A checkpoint whose files cannot be written (a full disk, or here a file-size limit, which
//! fails writes the same way: with an error from `write`, not from `fsync`) fails cleanly:
//! `commit_checkpoint` returns the error, nothing of that checkpoint is left on disk, the stage
//! goes on, and the next checkpoint, once writes succeed again, commits and restores.
//!
//! The limit is `RLIMIT_FSIZE`, set for this test process only (this file holds one test, and
//! cargo runs each test file in its own process); SIGXFSZ is ignored so that the write returns
//! EFBIG instead of the signal ending the process.

use sluice::checkpoint::{
    CheckpointError, CheckpointRefused, CheckpointStore, Checkpointing, Codec, SourcePosition,
};
use sluice::{from_fn, Output, OutputMode, Outputs, Stage};
use std::time::Duration;

fn set_file_size_limit(bytes: u64) {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscalls on this process's own limits and signal disposition.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

#[test]
fn a_checkpoint_that_cannot_be_written_fails_cleanly_and_the_next_one_commits() {
    let dir = std::env::temp_dir().join(format!("sluice-write-failure-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let stage = Stage::builder(|_| {
        from_fn(|s: &String| {
            let s = s.clone();
            async move {
                glommio::timer::sleep(Duration::from_millis(30)).await;
                Ok::<_, std::io::Error>(Outputs::One(s.len() as u64))
            }
        })
    })
    .shards(1)
    .capacity(64)
    .mode(OutputMode::Ordered)
    .checkpointing(Checkpointing::new(&dir, Codec::utf8(), Codec::u64()))
    .start()
    .unwrap();
    let (mut producer, mut consumer, handle) = stage.split();
    // 64 entries of 300 bytes in flight make a snapshot far above the 4 KiB limit.
    set_file_size_limit(4096);
    let feeder = std::thread::spawn(move || {
        let record = "x".repeat(300);
        for i in 0..200u64 {
            producer.push(record.clone()).unwrap();
            if i == 100 || i == 180 {
                let at = SourcePosition {
                    offset: i + 1,
                    records: i + 1,
                    digest: 0,
                };
                // Checkpoint 1 may still be committing when the second is due: wait for it.
                while let Err(refused) = producer.checkpoint(at) {
                    assert!(
                        matches!(refused, CheckpointRefused::InProgress { .. }),
                        "{refused}"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    });
    let mut sink = 0u64;
    let mut results = vec![];
    while let Some(item) = consumer.recv() {
        match item.unwrap() {
            Output::Record { .. } => sink += 1,
            Output::Watermark(_) => {}
            Output::Checkpoint(id) => {
                let result = consumer.commit_checkpoint(id, sink);
                if id == 1 {
                    // Writes work again from here on.
                    set_file_size_limit(libc::RLIM_INFINITY);
                }
                results.push((id, result));
            }
        }
    }
    feeder.join().unwrap();
    handle.join().unwrap();
    assert_eq!(sink, 200, "the stage went on after the failed checkpoint");
    assert_eq!(results.len(), 2);
    match &results[0] {
        (1, Err(e @ (CheckpointError::Io { .. } | CheckpointError::NoSpace { .. }))) => {
            assert!(e.to_string().contains("chk-"), "names the file: {e}")
        }
        other => panic!("checkpoint 1 should fail with a write error: {other:?}"),
    }
    assert!(matches!(results[1], (2, Ok(()))), "{:?}", results[1]);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("chk-00000000000000000001")),
        "checkpoint 1 left files behind: {names:?}"
    );
    let restored = CheckpointStore::open(&dir, 2)
        .unwrap()
        .restore()
        .unwrap()
        .expect("checkpoint 2 is there");
    assert_eq!(restored.manifest.checkpoint_id, 2);
    assert_eq!(restored.manifest.source_offset, 181);
    let _ = std::fs::remove_dir_all(&dir);
}
