//! RabbitMQ crash safety: `flowgate run` (JSON-lines sink, embedded store) is SIGKILLed
//! mid-stream and restarted each time.
//!
//! - A classic queue, dedup by the AMQP message id, 10 kills: unacknowledged messages come
//!   back (redelivered); afterwards every message is in the sink, the queue is empty, and
//!   duplicates stay within the documented window.
//! - A stream, no dedup, 5 kills: each restart resumes after the stored checkpoint (a restart
//!   from the stream's start would write thousands of duplicates); every message arrives.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used)]

mod cli;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowgate_runtime::adapters::JsonLinesSink;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const MESSAGES: usize = 16_000;
const KILLS: usize = 10;
const BATCH: usize = 100;
const IN_FLIGHT: usize = 500;

use flowgate_rig_tests::endpoint as env;

async fn queue_depth(url: &str, queue: &str, kind: &str, publish: bool) -> u32 {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    if publish {
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut confirms = Vec::with_capacity(MESSAGES);
        for i in 0..MESSAGES {
            let id = format!("m{i}");
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    id.as_bytes(),
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(id.as_str().into()),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }
    conn.close(200, "done".into()).await.unwrap();
    q.message_count()
}

#[test]
fn sigkill_loop_against_rabbitmq_loses_nothing() {
    sigkill_loop("classic", KILLS, true);
}

#[test]
fn sigkill_loop_on_a_stream_resumes_from_the_checkpoint() {
    sigkill_loop("stream", 5, false);
}

/// `kills` SIGKILLs of `flowgate run` consuming a queue of `kind`, then a final run; with
/// `dedup`, by the message id.
fn sigkill_loop(kind: &str, kills: usize, dedup: bool) {
    let url = env("FLOWGATE_TEST_RABBITMQ_URL");
    let bin = env!("CARGO_BIN_EXE_flowgate");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let queue = format!("crash-{kind}-{nanos}");
    rt.block_on(queue_depth(&url, &queue, kind, true));

    let jsonl = dir.path().join("out.jsonl");
    let consume = dir.path().join("consume.toml");
    std::fs::write(
        &consume,
        format!(
            "name = \"crash-{nanos}\"\n\
             [source]\ntype = \"rabbitmq\"\nurl = \"{url}\"\nqueue = \"{queue}\"\nqueue_type = \"{kind}\"\nprefetch = 300\n\
             [sink]\ntype = \"jsonl\"\npath = \"{}\"\nfaults = {{ capacity_per_sec = 1000 }}\n\
             [store]\ntype = \"embedded\"\npath = \"{}\"\n\
             {}\
             [runtime]\nmax_in_flight_per_partition = {IN_FLIGHT}\n[runtime.batch]\nmax_records = {BATCH}\n",
            jsonl.display(),
            dir.path().join("data").display(),
            if dedup { "[dedup]\nkey = \"key\"\n" } else { "" },
        ),
    )
    .unwrap();
    // From outside, before anything runs: reachable; a classic queue's depth is its lag, and
    // so is a stream's distance to its end (no checkpoint yet: the whole stream).
    let (code, report) = cli::validate(&consume);
    assert_eq!(code, 0, "{report}");
    let lag = cli::lag(&consume);
    assert_eq!(
        lag[&queue]["lag_records"].as_u64(),
        Some(MESSAGES as u64),
        "{lag:?}"
    );
    assert!(lag[&queue]["owner"].is_null(), "{lag:?}");
    let log = dir.path().join("consumer.log");
    let mut rng = fastrand::Rng::with_seed(13);
    let started = Instant::now();
    for _ in 0..kills {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "kill loop took too long"
        );
        let mut child = Command::new(bin)
            .args(["run", "-c"])
            .arg(&consume)
            .env("FLOWGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(600..1200)));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the consumer exited on its own: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let written_before_final = JsonLinesSink::read(&jsonl).map(|r| r.len()).unwrap_or(0);
    assert!(
        written_before_final > 0 && written_before_final < MESSAGES,
        "the kills must interrupt real work ({written_before_final} of {MESSAGES})"
    );
    let out = Command::new(bin)
        .args(["run", "-c"])
        .arg(&consume)
        .args(["--duration", "25s"])
        .env("FLOWGATE_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "final run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if kind != "stream" {
        assert_eq!(
            rt.block_on(queue_depth(&url, &queue, kind, false)),
            0,
            "every message acknowledged"
        );
        let lag = cli::lag(&consume);
        assert_eq!(lag[&queue]["lag_records"].as_u64(), Some(0), "{lag:?}");
        assert_eq!(lag[&queue]["lag_seconds"].as_f64(), Some(0.0), "{lag:?}");
    }
    let records = JsonLinesSink::read(&jsonl).unwrap();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        *seen
            .entry(String::from_utf8_lossy(&r.payload).into_owned())
            .or_default() += 1;
    }
    let missing: Vec<String> = (0..MESSAGES)
        .map(|i| format!("m{i}"))
        .filter(|m| !seen.contains_key(m))
        .take(10)
        .collect();
    assert!(missing.is_empty(), "messages lost: {missing:?}");
    assert_eq!(seen.len(), MESSAGES);
    let duplicates = records.len() - seen.len();
    let summary = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "rabbitmq/crash: final run: {}",
        summary
            .lines()
            .find(|l| l.contains("dedup hits"))
            .unwrap_or("(no summary)")
            .trim()
    );
    // With dedup, a batch per kill (marked but not acknowledged); without, what was in flight
    // or written after the last checkpoint: at most the in-flight limit per kill.
    let window = kills * if dedup { BATCH } else { IN_FLIGHT };
    eprintln!(
        "rabbitmq/crash ({kind}): {kills} SIGKILLs, {MESSAGES} messages, {written_before_final} written before the final run, {duplicates} duplicates (window bound {window})"
    );
    assert!(
        duplicates <= window,
        "duplicates beyond the documented window"
    );
}
