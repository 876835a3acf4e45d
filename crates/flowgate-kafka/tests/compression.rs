//! Every compression codec, both ways, checked with Kafka's own tools: topics written by the
//! console producer with `compression.type` gzip, snappy, lz4 and zstd are read completely by
//! the source; the sink writes each codec (the broker's log segment says so, `DumpLogSegments`)
//! and the console consumer reads every record back.
#![cfg(feature = "broker-tests")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use flowgate_core::testkit::source::Driver;
use flowgate_core::{PartitionId, Position, Record, Sink};
use flowgate_kafka::{
    Compression, KafkaSink, KafkaSinkConfig, KafkaSource, KafkaSourceConfig, partition_id,
};

mod common;
use common::{bootstrap, create_topic, unique};

const RECORDS: usize = 300;
const CODECS: [(Compression, &str); 4] = [
    (Compression::Gzip, "gzip"),
    (Compression::Snappy, "snappy"),
    (Compression::Lz4, "lz4"),
    (Compression::Zstd, "zstd"),
];

fn kafka_tool(class: &str) -> Command {
    let mut cmd = Command::new("java");
    cmd.args([
        "-cp",
        &flowgate_rig_tests::endpoint("FLOWGATE_TEST_KAFKA_CLASSPATH"),
        class,
    ]);
    cmd
}

/// A Kafka tool that moved between releases, as the rig's release has it.
fn moved_class(env: &str) -> String {
    flowgate_rig_tests::endpoint(env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_reads_topics_of_every_codec_written_by_the_console_producer() {
    for (_, codec) in CODECS {
        let topic = unique(&format!("codec-in-{codec}"));
        create_topic(&topic, 1).await;
        let mut producer = kafka_tool(&moved_class("FLOWGATE_TEST_KAFKA_CONSOLE_PRODUCER"))
            .args(["--bootstrap-server", &bootstrap(), "--topic", &topic])
            .args(["--producer-property", &format!("compression.type={codec}")])
            .args(["--producer-property", "linger.ms=50"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        {
            let mut stdin = producer.stdin.take().unwrap();
            for i in 0..RECORDS {
                writeln!(stdin, "{codec} record {i} {}", "x".repeat(100)).unwrap();
            }
        }
        assert!(
            producer.wait().unwrap().success(),
            "console producer ({codec})"
        );
        let source = KafkaSource::new(KafkaSourceConfig {
            bootstrap_servers: bootstrap(),
            topics: vec![topic.clone()],
            group_id: Some(unique("codec-group")),
            ..Default::default()
        })
        .unwrap();
        let mut d = Driver::open(source, RECORDS * 2).await;
        let p = partition_id(&topic, 0);
        let got = d.read_until(std::slice::from_ref(&p), RECORDS).await;
        d.close().await;
        let records = &got[&p];
        assert_eq!(records.len(), RECORDS, "{codec}: every record");
        for (i, r) in records.iter().enumerate() {
            let text = String::from_utf8_lossy(&r.payload);
            assert!(
                text.starts_with(&format!("{codec} record {i} ")),
                "{codec}: {text}"
            );
        }
        eprintln!(
            "kafka/compression: {codec} topic from the console producer: {RECORDS} records read"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_writes_every_codec_and_the_console_consumer_reads_it() {
    let log_dir = kafka_log_dir();
    for (compression, codec) in CODECS {
        let topic = unique(&format!("codec-out-{codec}"));
        create_topic(&topic, 1).await;
        let sink = KafkaSink::new(KafkaSinkConfig {
            bootstrap_servers: bootstrap(),
            topic: Some(topic.clone()),
            compression,
            linger: Duration::from_millis(20),
            ..Default::default()
        })
        .unwrap();
        let batch: Vec<Record> = (0..RECORDS)
            .map(|i| {
                Record::new(
                    PartitionId::new("gen"),
                    Position::from(i as u64),
                    bytes::Bytes::from(format!("{codec} out {i} {}", "y".repeat(100))),
                )
            })
            .collect();
        sink.write(&batch).await.unwrap();
        sink.close().await.unwrap();

        let out = kafka_tool("org.apache.kafka.tools.consumer.ConsoleConsumer")
            .args(["--bootstrap-server", &bootstrap(), "--topic", &topic])
            .args(["--from-beginning", "--max-messages", &RECORDS.to_string()])
            .args(["--timeout-ms", "30000"])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            RECORDS,
            "{codec}: the console consumer read them all"
        );
        assert!(
            lines[0].starts_with(&format!("{codec} out 0 ")),
            "{}",
            lines[0]
        );

        let segment = log_dir.join(format!("{topic}-0/00000000000000000000.log"));
        let dump = kafka_tool(&moved_class("FLOWGATE_TEST_KAFKA_DUMP_LOG_SEGMENTS"))
            .arg("--files")
            .arg(&segment)
            .output()
            .unwrap();
        let (status, err) = (dump.status, String::from_utf8_lossy(&dump.stderr));
        let dump = String::from_utf8_lossy(&dump.stdout);
        let want = format!("compresscodec: {codec}");
        assert!(
            dump.contains(&want),
            "{codec}: the log holds {want}; DumpLogSegments ({status}):\n{dump}\n{err}"
        );
        eprintln!(
            "kafka/compression: the sink wrote {codec} ({want}), the console consumer read {RECORDS}"
        );
    }
}

/// The rig broker's log directory, from its `server.properties`.
fn kafka_log_dir() -> std::path::PathBuf {
    let state = std::path::PathBuf::from(flowgate_rig_tests::endpoint("FLOWGATE_TEST_RIG_STATE"));
    let props = std::fs::read_to_string(state.join("kafka/server.properties")).unwrap();
    props
        .lines()
        .find_map(|l| l.strip_prefix("log.dirs="))
        .map(std::path::PathBuf::from)
        .expect("log.dirs in the rig's server.properties")
}
