//! The SIGKILL loop of `crash.rs` with the PostgreSQL store (`cargo xtask brokers up`): a
//! generator into the PostgreSQL table sink, checkpoints and dedup marks in the same database;
//! 20 kills at random moments, then a run to the end: the table holds exactly one row per
//! record.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_complete, count, kill_loop};
use flowgate_checkpoint::{PostgresConfig, PostgresStore, TableMode};

#[test]
fn sigkill_loop_into_the_postgres_table_sink_is_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = flowgate_rig_tests::endpoint("FLOWGATE_TEST_POSTGRES_URL");
    let schema = flowgate_rig_tests::unique("crash").replace('-', "_");
    let kills = kill_loop(
        dir.path(),
        "type = \"table\"\ntable = \"events\"",
        &format!("type = \"postgres\"\nurl = \"{url}\"\nschema = \"{schema}\""),
        11,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(async {
        let store = PostgresStore::connect(PostgresConfig {
            url,
            schema,
            ..Default::default()
        })
        .await
        .unwrap();
        store
            .table_sink("crash", "events", TableMode::Insert)
            .await
            .unwrap()
            .rows()
            .await
            .unwrap()
    });
    let (m, total) = count(
        rows.iter()
            .map(|r| (r.partition.to_string(), r.position.as_u64().unwrap())),
    );
    assert_complete(&m);
    eprintln!(
        "crash/postgres table (transactional): {kills} SIGKILLs, {} records, {} rows, {} duplicates",
        m.len(),
        total,
        total - m.len()
    );
    assert_eq!(total, m.len(), "exactly one row per record");
}
