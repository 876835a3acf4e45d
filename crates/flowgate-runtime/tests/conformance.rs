//! The in-process adapters pass the core conformance suite.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;
use flowgate_core::testkit::{sink::SinkHarness, source::SourceHarness};
use flowgate_core::{Error, PartitionId, Position, Record};
use flowgate_runtime::adapters::{
    GeneratorConfig, GeneratorSource, JsonLinesConfig, JsonLinesSink, MemorySink, MemorySource,
};

struct GenHarness(Mutex<u64>);

#[async_trait]
impl SourceHarness for GenHarness {
    type Source = GeneratorSource;
    async fn prepare(&self, per_partition: usize) -> Result<Vec<PartitionId>, Error> {
        *self.0.lock().unwrap() = per_partition as u64;
        Ok(self.open_source().await?.partitions().to_vec())
    }
    async fn open_source(&self) -> Result<GeneratorSource, Error> {
        let n = *self.0.lock().unwrap();
        GeneratorSource::new(GeneratorConfig {
            partitions: 3,
            records_per_partition: Some(n),
            ..Default::default()
        })
    }
}

#[tokio::test]
async fn generator_source_conforms() {
    flowgate_core::testkit::source::run_all(&GenHarness(Mutex::new(0))).await;
}

struct MemHarness(Mutex<Vec<Record>>);

#[async_trait]
impl SourceHarness for MemHarness {
    type Source = MemorySource;
    async fn prepare(&self, per_partition: usize) -> Result<Vec<PartitionId>, Error> {
        let parts: Vec<PartitionId> = (0..2).map(|p| PartitionId::new(format!("m-{p}"))).collect();
        let mut records = Vec::new();
        for p in &parts {
            for i in 0..per_partition as u64 {
                // Sparse positions, like Kinesis sequence numbers.
                records.push(Record::new(
                    p.clone(),
                    Position::from(1000 + i * 7),
                    format!("{p}-{i}"),
                ));
            }
        }
        *self.0.lock().unwrap() = records;
        Ok(parts)
    }
    async fn open_source(&self) -> Result<MemorySource, Error> {
        Ok(MemorySource::new(self.0.lock().unwrap().clone()))
    }
}

#[tokio::test]
async fn memory_source_conforms() {
    flowgate_core::testkit::source::run_all(&MemHarness(Mutex::new(Vec::new()))).await;
}

struct MemSinkHarness(MemorySink);

#[async_trait]
impl SinkHarness for MemSinkHarness {
    type Sink = MemorySink;
    async fn open_sink(&self) -> Result<MemorySink, Error> {
        Ok(self.0.clone())
    }
    async fn read_back(&self) -> Result<Vec<Record>, Error> {
        Ok(self.0.records())
    }
}

#[tokio::test]
async fn memory_sink_conforms() {
    flowgate_core::testkit::sink::run_all(&MemSinkHarness(MemorySink::new())).await;
}

struct JsonlHarness(tempfile::TempDir);

impl JsonlHarness {
    fn path(&self) -> PathBuf {
        self.0.path().join("out.jsonl")
    }
}

#[async_trait]
impl SinkHarness for JsonlHarness {
    type Sink = JsonLinesSink;
    async fn open_sink(&self) -> Result<JsonLinesSink, Error> {
        JsonLinesSink::open(JsonLinesConfig {
            path: self.path(),
            fsync: false,
        })
        .await
    }
    async fn read_back(&self) -> Result<Vec<Record>, Error> {
        JsonLinesSink::read(&self.path())
    }
}

#[tokio::test]
async fn json_lines_sink_conforms() {
    flowgate_core::testkit::sink::run_all(&JsonlHarness(tempfile::tempdir().unwrap())).await;
}
