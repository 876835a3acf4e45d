//! Checkpoint and dedup store conformance.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    Checkpoint, CheckpointStore, DedupStore, ErrorKind, IdempotencyKey, Lease, LeaseStore,
    PartitionId, Position,
};

mod positional;

pub use positional::positional_marks;

/// Opens a store under test; `reopen` must see everything committed before.
#[async_trait]
pub trait StoreHarness: Send + Sync {
    /// The store type.
    type Store: CheckpointStore + DedupStore + LeaseStore + 'static;

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

const TTL: Duration = Duration::from_secs(30);

async fn lease_of<S: LeaseStore + ?Sized>(s: &S, pipeline: &str, p: &str) -> Option<Lease> {
    s.leases(pipeline)
        .await
        .expect("leases")
        .into_iter()
        .find(|l| l.partition.as_str() == p)
}

/// Take, renew, release: one owner at a time, every take raises the epoch, a lease taken by
/// another can be neither renewed nor released by the loser; leases survive re-opening.
pub async fn lease_take_renew_release<H: StoreHarness>(h: &H) {
    let pipeline = "conf-lease";
    let shard = PartitionId::new("shardId-000000000000");
    let first = {
        let s = h.open().await;
        assert!(lease_of(&*s, pipeline, shard.as_str()).await.is_none());
        let a = s
            .acquire(pipeline, &shard, "worker-a", TTL, None)
            .await
            .expect("acquire")
            .expect("contract: a missing lease MUST be granted");
        assert_eq!(a.owner.as_deref(), Some("worker-a"));
        assert!(a.is_held_by("worker-a") && !a.is_available());
        assert!(
            s.acquire(pipeline, &shard, "worker-b", TTL, None)
                .await
                .expect("acquire")
                .is_none(),
            "contract: a live lease MUST NOT be granted to another worker"
        );
        let renewed = s.renew(pipeline, &a, TTL).await.expect("renew");
        assert_eq!(renewed.epoch, a.epoch, "a renewal keeps the epoch");
        assert!(renewed.remaining > TTL / 2, "renewed for the ttl");
        a
    };
    // Re-opened: the lease is still there, still held.
    let s = h.open().await;
    let stored = lease_of(&*s, pipeline, shard.as_str())
        .await
        .expect("contract: leases MUST survive re-opening the store");
    assert_eq!(
        (stored.owner.as_deref(), stored.epoch),
        (Some("worker-a"), first.epoch)
    );
    s.release(pipeline, &first).await.expect("release");
    let released = lease_of(&*s, pipeline, shard.as_str())
        .await
        .expect("lease");
    assert!(released.is_available() && released.owner.is_none());
    let b = s
        .acquire(pipeline, &shard, "worker-b", TTL, None)
        .await
        .expect("acquire")
        .expect("contract: a released lease MUST be granted");
    assert!(
        b.epoch > first.epoch,
        "contract: every take raises the epoch"
    );
    for (what, result) in [
        ("renew", s.renew(pipeline, &first, TTL).await.map(|_| ())),
        ("release", s.release(pipeline, &first).await),
        ("finish", s.finish(pipeline, &first).await),
    ] {
        assert_eq!(
            result
                .expect_err("contract: the loser MUST be fenced")
                .kind(),
            ErrorKind::Fenced,
            "{what} by a worker whose lease was taken"
        );
    }
    let held = lease_of(&*s, pipeline, shard.as_str())
        .await
        .expect("lease");
    assert_eq!(
        (held.owner.as_deref(), held.epoch),
        (Some("worker-b"), b.epoch)
    );
}

/// A lease nobody renews expires (by the store's clock) and can be taken; until it is taken
/// its owner may still renew it. Stealing needs the epoch the thief saw.
pub async fn lease_expiry_and_stealing<H: StoreHarness>(h: &H) {
    let pipeline = "conf-lease-expiry";
    let s = h.open().await;
    let shard = PartitionId::new("shardId-000000000001");
    let short = Duration::from_millis(300);
    let a = s
        .acquire(pipeline, &shard, "worker-a", short, None)
        .await
        .expect("acquire")
        .expect("granted");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let expired = lease_of(&*s, pipeline, shard.as_str())
        .await
        .expect("lease");
    assert!(
        expired.remaining.is_zero() && expired.is_available(),
        "contract: a lease past its ttl MUST read as expired: {expired:?}"
    );
    let a = s
        .renew(pipeline, &a, short)
        .await
        .expect("contract: an expired lease nobody took MAY be renewed by its owner");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = s
        .acquire(pipeline, &shard, "worker-b", TTL, None)
        .await
        .expect("acquire")
        .expect("contract: an expired lease MUST be granted");
    assert!(b.epoch > a.epoch);
    assert_eq!(
        s.renew(pipeline, &a, TTL).await.expect_err("fenced").kind(),
        ErrorKind::Fenced
    );

    // Stealing a live lease: only with the epoch the thief saw.
    assert!(
        s.acquire(pipeline, &shard, "worker-c", TTL, Some(b.epoch - 1))
            .await
            .expect("acquire")
            .is_none(),
        "contract: a steal with a stale epoch MUST fail"
    );
    let c = s
        .acquire(pipeline, &shard, "worker-c", TTL, Some(b.epoch))
        .await
        .expect("acquire")
        .expect("contract: a steal with the current epoch MUST succeed");
    assert!(c.epoch > b.epoch && c.is_held_by("worker-c"));
}

/// A finished lease is never taken again, even by stealing.
pub async fn finished_leases_stay_finished<H: StoreHarness>(h: &H) {
    let pipeline = "conf-lease-finish";
    let s = h.open().await;
    let shard = PartitionId::new("shardId-000000000002");
    let a = s
        .acquire(pipeline, &shard, "worker-a", TTL, None)
        .await
        .expect("acquire")
        .expect("granted");
    s.finish(pipeline, &a).await.expect("finish");
    let done = lease_of(&*s, pipeline, shard.as_str())
        .await
        .expect("lease");
    assert!(done.finished && !done.is_available() && done.owner.is_none());
    for steal in [None, Some(done.epoch)] {
        assert!(
            s.acquire(pipeline, &shard, "worker-b", TTL, steal)
                .await
                .expect("acquire")
                .is_none(),
            "contract: a finished lease MUST NOT be granted"
        );
    }
}

/// Of many workers racing for one lease (concurrent calls on one handle; a pooled store runs
/// them on several connections), exactly one gets it.
pub async fn lease_race_has_one_winner<H: StoreHarness>(h: &H) {
    let pipeline = "conf-lease-race";
    let shard = PartitionId::new("shardId-000000000003");
    let store = h.open().await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = Arc::clone(&store);
        let shard = shard.clone();
        tasks.push(tokio::spawn(async move {
            s.acquire(pipeline, &shard, &format!("racer-{i}"), TTL, None)
                .await
                .expect("acquire")
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        if let Some(l) = t.await.expect("task") {
            winners.push(l);
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "contract: exactly one racer MUST win: {winners:?}"
    );
}

/// From the moment a lease is taken, the loser's checkpoints for that partition are refused,
/// even before the new owner wrote one.
pub async fn lease_fences_checkpoints<H: StoreHarness>(h: &H) {
    let pipeline = "conf-lease-fence";
    let s = h.open().await;
    let shard = PartitionId::new("shardId-000000000004");
    let at = |pos: u64, fence: u64| {
        Checkpoint::new(shard.clone(), Position::from(pos)).with_fence(Some(fence))
    };
    let a = s
        .acquire(pipeline, &shard, "worker-a", TTL, None)
        .await
        .expect("acquire")
        .expect("granted");
    s.commit(pipeline, &[at(10, a.epoch)])
        .await
        .expect("the owner commits");
    let b = s
        .acquire(pipeline, &shard, "worker-b", TTL, Some(a.epoch))
        .await
        .expect("acquire")
        .expect("stolen");
    let refused = s
        .commit(pipeline, &[at(20, a.epoch)])
        .await
        .expect_err("contract: the loser's checkpoint MUST be refused once the lease is taken");
    assert_eq!(refused.kind(), ErrorKind::Fenced);
    s.commit(pipeline, &[at(15, b.epoch)])
        .await
        .expect("the new owner commits");
    let stored = load_one(&*s, pipeline, shard.as_str())
        .await
        .expect("stored");
    assert_eq!(
        (stored.position, stored.fence),
        (Position::from(15u64), Some(b.epoch))
    );
}

/// Runs every store conformance check.
pub async fn run_all<H: StoreHarness>(h: &H) {
    lease_take_renew_release(h).await;
    lease_expiry_and_stealing(h).await;
    finished_leases_stay_finished(h).await;
    lease_race_has_one_winner(h).await;
    lease_fences_checkpoints(h).await;
    checkpoints_are_durable(h).await;
    checkpoints_are_monotonic(h).await;
    stale_fence_is_refused(h).await;
    pipelines_are_isolated(h).await;
    dedup_marks_are_durable_and_expire(h).await;
    positional_marks(h).await;
}
