//! Checkpoint and dedup store conformance.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    Checkpoint, CheckpointStore, DedupStore, ErrorKind, IdempotencyKey, PartitionId, Position,
};

/// Opens a store under test; `reopen` must see everything committed before.
#[async_trait]
pub trait StoreHarness: Send + Sync {
    /// The store type.
    type Store: CheckpointStore + DedupStore + 'static;

    /// Opens (or re-opens, after dropping every earlier handle) the same durable store.
    async fn open(&self) -> Arc<Self::Store>;
}

fn cp(p: &str, pos: u64, fence: Option<u64>) -> Checkpoint {
    Checkpoint::new(PartitionId::new(p), Position::from(pos)).with_fence(fence)
}

async fn load_one<S: CheckpointStore + ?Sized>(
    s: &S,
    pipeline: &str,
    p: &str,
) -> Option<Checkpoint> {
    s.load(pipeline)
        .await
        .expect("load")
        .into_iter()
        .find(|c| c.partition.as_str() == p)
}

/// Commits are readable and survive re-opening the store.
pub async fn checkpoints_are_durable<H: StoreHarness>(h: &H) {
    let pipeline = "conf-durable";
    {
        let s = h.open().await;
        assert!(
            s.load(pipeline).await.expect("load").is_empty(),
            "a new pipeline has no checkpoints"
        );
        s.commit(pipeline, &[cp("a", 10, None), cp("b", 3, None)])
            .await
            .expect("commit");
        s.commit(pipeline, &[cp("a", 12, None)])
            .await
            .expect("commit");
        let big = Checkpoint::new(
            PartitionId::new("shardId-000000000001"),
            Position::parse_decimal("49590338271490256608559692538361571095921575989136588898")
                .expect("decimal"),
        );
        s.commit(pipeline, &[big])
            .await
            .expect("commit of a Kinesis-size position");
    }
    let s = h.open().await;
    assert_eq!(
        load_one(&*s, pipeline, "a").await.map(|c| c.position),
        Some(Position::from(12)),
        "durable across reopen"
    );
    assert_eq!(
        load_one(&*s, pipeline, "b").await.map(|c| c.position),
        Some(Position::from(3))
    );
    assert_eq!(
        load_one(&*s, pipeline, "shardId-000000000001")
            .await
            .map(|c| c.position.to_string()),
        Some("49590338271490256608559692538361571095921575989136588898".to_string()),
        "positions beyond u128 must round-trip"
    );
}

/// A checkpoint never moves backwards through `commit`; `reset` clears it.
pub async fn checkpoints_are_monotonic<H: StoreHarness>(h: &H) {
    let pipeline = "conf-monotonic";
    let s = h.open().await;
    s.commit(pipeline, &[cp("a", 100, None)])
        .await
        .expect("commit");
    let err = s
        .commit(pipeline, &[cp("a", 99, None), cp("b", 5, None)])
        .await;
    assert!(
        err.is_err(),
        "contract: a commit moving a checkpoint backwards MUST be refused"
    );
    assert_eq!(
        load_one(&*s, pipeline, "a").await.map(|c| c.position),
        Some(Position::from(100))
    );
    assert_eq!(
        load_one(&*s, pipeline, "b").await,
        None,
        "contract: a refused commit MUST be atomic"
    );
    s.commit(pipeline, &[cp("a", 100, None)])
        .await
        .expect("re-committing the same position is fine");
    s.reset(pipeline, Some(&[PartitionId::new("a")]))
        .await
        .expect("reset");
    assert_eq!(load_one(&*s, pipeline, "a").await, None);
    s.commit(pipeline, &[cp("a", 1, None)])
        .await
        .expect("after reset a lower position is accepted");
    s.reset(pipeline, None).await.expect("reset all");
    assert!(s.load(pipeline).await.expect("load").is_empty());
}

/// A write with an older fence than the stored one is refused with `Fenced`.
pub async fn stale_fence_is_refused<H: StoreHarness>(h: &H) {
    let pipeline = "conf-fence";
    let s = h.open().await;
    s.commit(pipeline, &[cp("a", 10, Some(1))])
        .await
        .expect("commit gen 1");
    s.commit(pipeline, &[cp("a", 20, Some(2))])
        .await
        .expect("a newer generation takes over");
    let err = s
        .commit(pipeline, &[cp("a", 30, Some(1))])
        .await
        .expect_err("contract: a stale fence MUST be refused");
    assert_eq!(err.kind(), ErrorKind::Fenced, "{err}");
    let stored = load_one(&*s, pipeline, "a").await.expect("stored");
    assert_eq!(
        (stored.position, stored.fence),
        (Position::from(20), Some(2))
    );
}

/// Pipelines do not see each other's checkpoints or marks.
pub async fn pipelines_are_isolated<H: StoreHarness>(h: &H) {
    let s = h.open().await;
    s.commit("conf-iso-1", &[cp("a", 1, None)])
        .await
        .expect("commit");
    assert!(s.load("conf-iso-2").await.expect("load").is_empty());
    let k = [IdempotencyKey::new("k")];
    s.mark("conf-iso-1", &k, Duration::from_secs(60))
        .await
        .expect("mark");
    assert_eq!(s.seen("conf-iso-2", &k).await.expect("seen"), vec![false]);
}

/// Marks are answered in order, survive re-opening, and expire after their TTL.
pub async fn dedup_marks_are_durable_and_expire<H: StoreHarness>(h: &H) {
    let pipeline = "conf-dedup";
    let keys: Vec<IdempotencyKey> = (0..100)
        .map(|i| IdempotencyKey::new(format!("k{i}")))
        .collect();
    {
        let s = h.open().await;
        assert_eq!(
            s.seen(pipeline, &keys).await.expect("seen"),
            vec![false; 100]
        );
        s.mark(pipeline, &keys[..50], Duration::from_secs(3600))
            .await
            .expect("mark");
        s.mark(pipeline, &keys[50..60], Duration::from_millis(300))
            .await
            .expect("mark short");
    }
    let s = h.open().await;
    let seen = s.seen(pipeline, &keys).await.expect("seen");
    assert!(
        seen[..60].iter().all(|b| *b),
        "contract: marks MUST be durable when mark returns"
    );
    assert!(seen[60..].iter().all(|b| !*b), "unmarked keys are not seen");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let seen = s.seen(pipeline, &keys[40..60]).await.expect("seen");
    assert!(seen[..10].iter().all(|b| *b), "long TTL still live");
    assert!(
        seen[10..].iter().all(|b| !*b),
        "contract: marks MUST expire after their TTL"
    );
    assert_eq!(
        s.seen(pipeline, &[]).await.expect("empty"),
        Vec::<bool>::new()
    );
}

/// Runs every store conformance check.
pub async fn run_all<H: StoreHarness>(h: &H) {
    checkpoints_are_durable(h).await;
    checkpoints_are_monotonic(h).await;
    stale_fence_is_refused(h).await;
    pipelines_are_isolated(h).await;
    dedup_marks_are_durable_and_expire(h).await;
}
