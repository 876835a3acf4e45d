//! Crash safety: a pipeline in a child process is SIGKILLed at random moments, many times,
//! and restarted each time. Afterwards every generated record must be in the sink; with dedup
//! the duplicates may come only from the documented window (records confirmed by the sink but
//! not yet marked when the process died); with the transactional table sink there must be
//! exactly one copy of each record.
#![allow(clippy::unwrap_used)]

mod common;

use common::{MAX_BATCH, MAX_CONCURRENCY, assert_complete, count, kill_loop};
use flowgate_checkpoint::EmbeddedStore;
use flowgate_runtime::adapters::JsonLinesSink;

fn embedded(dir: &std::path::Path) -> String {
    format!(
        "type = \"embedded\"\npath = \"{}\"",
        dir.join("data").display()
    )
}

#[test]
fn sigkill_loop_with_dedup_loses_nothing_and_duplicates_stay_in_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let kills = kill_loop(
        dir.path(),
        &format!("type = \"jsonl\"\npath = \"{}\"", out.display()),
        &embedded(dir.path()),
        42,
    );
    let records = JsonLinesSink::read(&out).unwrap();
    let (m, total) = count(
        records
            .iter()
            .map(|r| (r.partition.to_string(), r.position.as_u64().unwrap())),
    );
    assert_complete(&m);
    let duplicates = total - m.len();
    // The window: per kill, at most the batches confirmed by the sink and not yet marked, i.e.
    // concurrency × batch size (plus a torn line at the kill).
    let bound = kills as u64 * (MAX_CONCURRENCY * MAX_BATCH + 1);
    eprintln!(
        "crash/jsonl+dedup: {kills} SIGKILLs, {} records, {duplicates} duplicates ({:.3}%), window bound {bound}",
        m.len(),
        duplicates as f64 * 100.0 / m.len() as f64
    );
    assert!(
        (duplicates as u64) <= bound,
        "{duplicates} duplicates exceed the documented window ({bound})"
    );
}

#[test]
fn sigkill_loop_with_the_transactional_sink_is_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let kills = kill_loop(
        dir.path(),
        "type = \"table\"\ntable = \"events\"",
        &embedded(dir.path()),
        7,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(async {
        let store = EmbeddedStore::open_dir(dir.path().join("data"))
            .await
            .unwrap();
        store.table_sink("events").rows().await.unwrap()
    });
    let (m, total) = count(
        rows.iter()
            .map(|r| (r.partition.to_string(), r.position.as_u64().unwrap())),
    );
    assert_complete(&m);
    eprintln!(
        "crash/table (transactional): {kills} SIGKILLs, {} records, {} duplicates",
        m.len(),
        total - m.len()
    );
    assert_eq!(total, m.len(), "exactly one row per record");
}
