//! Checkpoint and dedup store conformance.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    Checkpoint, CheckpointStore, DedupStore, ErrorKind, IdempotencyKey, PartitionId, Position,
    PositionRange,
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

/// Positional marks (when supported): a range covers exactly its positions, survives
/// re-opening, is isolated per partition and pipeline, and expires.
pub async fn positional_marks<H: StoreHarness>(h: &H) {
    let pipeline = "conf-ranges";
    let p = PartitionId::new("p");
    let q = PartitionId::new("q");
    let range = |part: &PartitionId, a: u64, b: u64| PositionRange {
        partition: part.clone(),
        first: Position::from(a),
        last: Position::from(b),
    };
    let probe: Vec<Position> = [5u64, 10, 15, 20, 21, 30, 31, 45]
        .into_iter()
        .map(Position::from)
        .collect();
    {
        let s = h.open().await;
        if !s.supports_position_ranges() {
            return;
        }
        s.mark_ranges(
            pipeline,
            &[range(&p, 10, 20), range(&p, 30, 30)],
            Duration::from_secs(3600),
        )
        .await
        .expect("mark_ranges");
        s.mark_ranges(pipeline, &[range(&p, 40, 50)], Duration::from_millis(300))
            .await
            .expect("mark_ranges short");
    }
    let s = h.open().await;
    let seen = s
        .seen_positions(pipeline, &p, &probe)
        .await
        .expect("seen_positions");
    assert_eq!(
        seen,
        vec![false, true, true, true, false, true, false, true],
        "contract: a range covers exactly first..=last, durably"
    );
    // Unsorted input is answered in input order.
    let rev: Vec<Position> = probe.iter().rev().cloned().collect();
    let mut back = s
        .seen_positions(pipeline, &p, &rev)
        .await
        .expect("seen_positions");
    back.reverse();
    assert_eq!(back, seen);
    assert_eq!(
        s.seen_positions(pipeline, &q, &probe).await.expect("seen"),
        vec![false; 8],
        "partitions are isolated"
    );
    assert_eq!(
        s.seen_positions("conf-ranges-2", &p, &probe)
            .await
            .expect("seen"),
        vec![false; 8],
        "pipelines are isolated"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let seen = s
        .seen_positions(
            pipeline,
            &p,
            &[Position::from(45u64), Position::from(15u64)],
        )
        .await
        .expect("seen");
    assert_eq!(
        seen,
        vec![false, true],
        "contract: ranges expire after their TTL"
    );
    // A replayed, smaller batch inside an earlier range, then an overlapping one: the union stays
    // marked.
    s.mark_ranges(pipeline, &[range(&p, 100, 200)], Duration::from_secs(60))
        .await
        .expect("mark");
    s.mark_ranges(pipeline, &[range(&p, 150, 160)], Duration::from_secs(60))
        .await
        .expect("mark nested");
    s.mark_ranges(pipeline, &[range(&p, 190, 250)], Duration::from_secs(60))
        .await
        .expect("mark overlapping");
    let probe: Vec<Position> = [99u64, 100, 170, 199, 230, 250, 251]
        .into_iter()
        .map(Position::from)
        .collect();
    assert_eq!(
        s.seen_positions(pipeline, &p, &probe).await.expect("seen"),
        vec![false, true, true, true, true, true, false],
        "contract: nested and overlapping ranges keep their union marked"
    );
    let big = Position::parse_decimal("49590338271490256608559692538361571095921575989136588898")
        .expect("decimal");
    let bigger = big.successor();
    s.mark_ranges(
        pipeline,
        &[PositionRange {
            partition: q.clone(),
            first: big.clone(),
            last: big.clone(),
        }],
        Duration::from_secs(60),
    )
    .await
    .expect("mark big");
    assert_eq!(
        s.seen_positions(pipeline, &q, &[big, bigger])
            .await
            .expect("seen"),
        vec![true, false]
    );
}

/// Runs every store conformance check.
pub async fn run_all<H: StoreHarness>(h: &H) {
    checkpoints_are_durable(h).await;
    checkpoints_are_monotonic(h).await;
    stale_fence_is_refused(h).await;
    pipelines_are_isolated(h).await;
    dedup_marks_are_durable_and_expire(h).await;
    positional_marks(h).await;
}
