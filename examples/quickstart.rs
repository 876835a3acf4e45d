//! The quickstart as a library user writes it: a generator with a 2× spike feeding a sink
//! that can only take 14,000 records/s, on the embedded store in `./flowgate-data`, with a
//! status line. Run it twice: the second run resumes from the checkpoints.
//!
//! ```sh
//! cargo run --release --example quickstart
//! ```
//! (`flowgate quickstart` does the same from the CLI.)

use std::sync::Arc;
use std::time::Duration;

use flowgate::checkpoint::EmbeddedStore;
use flowgate::runtime::adapters::{
    FaultConfig, FaultInjectingSink, GeneratorConfig, GeneratorSource, NullSink, Spike,
};
use flowgate::runtime::{KeyExtractor, Pipeline, RuntimeSettings, Shutdown};

#[tokio::main]
async fn main() -> Result<(), flowgate::Error> {
    let store = Arc::new(EmbeddedStore::open_dir("./flowgate-data").await?);
    let source = GeneratorSource::new(GeneratorConfig {
        partitions: 4,
        rate: Some(10_000.0),
        spikes: vec![Spike {
            at: Duration::from_secs(4),
            duration: Duration::from_secs(5),
            factor: 2.0,
        }],
        ..Default::default()
    })?;
    let slow_sink = FaultInjectingSink::new(
        NullSink::default(),
        FaultConfig {
            capacity_per_sec: Some(14_000.0),
            ..Default::default()
        },
    );
    let pipeline = Pipeline::builder("quickstart-example")
        .source(source)
        .sink(slow_sink)
        .checkpoint_store(store.clone())
        .dedup(store, KeyExtractor::SourcePosition)
        .settings(RuntimeSettings {
            max_in_flight_per_partition: 2_000,
            ..Default::default()
        })
        .build()?;
    let stats = pipeline.stats();
    let status = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let s = stats.snapshot();
            eprintln!(
                "in {:>8}  out {:>8}  lag {:>6} ({:+.0}/s)  in-flight {:>5}  buffer {:>5} KiB  {}",
                s.records_in,
                s.records_out,
                s.lag,
                s.lag_rate,
                s.in_flight,
                s.buffer_bytes / 1024,
                s.health
            );
        }
    });
    let summary = pipeline
        .run(Shutdown::on_signals().or(Shutdown::after(Duration::from_secs(15))))
        .await?;
    status.abort();
    println!("{summary}");
    Ok(())
}
