//! Sink conformance.

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Error, IdempotencyKey, PartitionId, Position, Record, Sink};

/// Opens a sink under test and reads back what reached its destination.
#[async_trait]
pub trait SinkHarness: Send + Sync {
    /// The sink type.
    type Sink: Sink;

    /// A sink writing to a fresh destination (topic, queue, stream, file).
    async fn open_sink(&self) -> Result<Self::Sink, Error>;

    /// Every record the destination holds, in destination order. Payload and key must be
    /// filled; the idempotency key too if the sink forwards it.
    async fn read_back(&self) -> Result<Vec<Record>, Error>;
}

fn record(i: usize) -> Record {
    Record::new(
        PartitionId::new("conformance-0"),
        Position::new(i as u128),
        Bytes::from(format!("payload-{i:06}")),
    )
    .with_key(Bytes::from(format!("key-{}", i % 7)))
    .with_idempotency_key(IdempotencyKey::new(format!("idem-{i:06}")))
}

/// Confirmed writes are all readable, keys intact, in order for one partition; an empty
/// batch is accepted; the idempotency key is forwarded when the sink says it does.
pub async fn writes_are_read_back<H: SinkHarness>(h: &H) {
    let sink = h.open_sink().await.expect("open_sink");
    let caps = sink.capabilities();
    let max = caps.max_batch_records.unwrap_or(100).min(100);
    let total = max * 3 + 1;
    let records: Vec<Record> = (0..total).map(record).collect();
    sink.write(&[])
        .await
        .map_err(|e| format!("{e:?}"))
        .expect("contract: an empty batch MUST be accepted");
    for chunk in records.chunks(max) {
        sink.write(chunk)
            .await
            .map_err(|e| format!("{e:?}"))
            .expect("write to a healthy destination must succeed");
    }
    sink.flush().await.expect("flush");
    let back = h.read_back().await.expect("read_back");
    assert_eq!(
        back.len(),
        total,
        "contract: every confirmed record MUST be readable at the destination"
    );
    for (want, got) in records.iter().zip(&back) {
        assert_eq!(got.payload, want.payload, "payloads in order");
        assert_eq!(got.key, want.key, "keys preserved");
        if caps.forwards_idempotency_key {
            assert_eq!(
                got.idempotency_key, want.idempotency_key,
                "contract: the idempotency key MUST be forwarded"
            );
        }
    }
    tokio::time::timeout(std::time::Duration::from_secs(30), sink.close())
        .await
        .expect("contract: Sink::close MUST return within a bounded time")
        .expect("close");
}

/// A record over `max_record_bytes` is refused as poison, not retried forever.
pub async fn oversized_record_is_poison<H: SinkHarness>(h: &H) {
    let sink = h.open_sink().await.expect("open_sink");
    let Some(limit) = sink.capabilities().max_record_bytes else {
        return;
    };
    let big = Record::new(
        PartitionId::new("conformance-0"),
        Position::ZERO,
        Bytes::from(vec![b'x'; limit + 1]),
    );
    match sink.write(&[big]).await {
        Err(crate::WriteError::Batch(e)) => assert_eq!(e.kind(), crate::ErrorKind::Poison, "{e}"),
        Err(crate::WriteError::Partial(errs)) => {
            assert_eq!(errs.len(), 1);
            assert_eq!(errs[0].1.kind(), crate::ErrorKind::Poison, "{}", errs[0].1);
        }
        Ok(()) => panic!("contract: a record over max_record_bytes MUST be refused as poison"),
    }
}

/// Runs every sink conformance check.
pub async fn run_all<H: SinkHarness>(h: &H) {
    writes_are_read_back(h).await;
    oversized_record_is_poison(h).await;
}
