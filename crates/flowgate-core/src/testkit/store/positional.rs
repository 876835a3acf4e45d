//! Positional dedup marks: ranges of positions marked as processed, checked position by
//! position, with a TTL.

use std::time::Duration;

use super::StoreHarness;
use crate::{DedupStore, PartitionId, Position, PositionRange};

/// The pipeline the positional-mark checks write to, and one they must not see.
const RANGES_PIPELINE: &str = "conf-ranges";
const OTHER_RANGES_PIPELINE: &str = "conf-ranges-2";

fn range(partition: &PartitionId, first: u64, last: u64) -> PositionRange {
    PositionRange {
        partition: partition.clone(),
        first: Position::from(first),
        last: Position::from(last),
    }
}

fn positions(of: &[u64]) -> Vec<Position> {
    of.iter().copied().map(Position::from).collect()
}

async fn last_mark<S: DedupStore + ?Sized>(
    s: &S,
    pipeline: &str,
    partition: &PartitionId,
) -> Option<Position> {
    s.last_marked_position(pipeline, partition)
        .await
        .expect("last_marked_position")
}

/// Positional marks (when supported): a range covers exactly its positions, survives
/// re-opening, is isolated per partition and pipeline, and expires.
pub async fn positional_marks<H: StoreHarness>(h: &H) {
    let p = PartitionId::new("p");
    let q = PartitionId::new("q");
    if !mark_ranges_then_close(h, &p).await {
        return;
    }
    let s = h.open().await;
    ranges_cover_exactly_their_positions(&*s, &p, &q).await;
    last_mark_is_the_highest_live_end(&*s, &p, &q).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    expired_ranges_no_longer_count(&*s, &p).await;
    nested_and_overlapping_ranges_keep_their_union(&*s, &p).await;
    positions_beyond_u64_are_marked(&*s, &q).await;
}

/// Marks `10..=20` and `30..=30` for an hour and `40..=50` briefly, on a handle dropped
/// before the checks re-open the store; `false` if the store has no positional marks.
async fn mark_ranges_then_close<H: StoreHarness>(h: &H, p: &PartitionId) -> bool {
    let s = h.open().await;
    if !s.supports_position_ranges() {
        return false;
    }
    s.mark_ranges(
        RANGES_PIPELINE,
        &[range(p, 10, 20), range(p, 30, 30)],
        Duration::from_secs(3600),
    )
    .await
    .expect("mark_ranges");
    s.mark_ranges(
        RANGES_PIPELINE,
        &[range(p, 40, 50)],
        Duration::from_millis(300),
    )
    .await
    .expect("mark_ranges short");
    true
}

async fn ranges_cover_exactly_their_positions<S: DedupStore + ?Sized>(
    s: &S,
    p: &PartitionId,
    q: &PartitionId,
) {
    let probe = positions(&[5, 10, 15, 20, 21, 30, 31, 45]);
    let seen = s
        .seen_positions(RANGES_PIPELINE, p, &probe)
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
        .seen_positions(RANGES_PIPELINE, p, &rev)
        .await
        .expect("seen_positions");
    back.reverse();
    assert_eq!(back, seen);
    assert_eq!(
        s.seen_positions(RANGES_PIPELINE, q, &probe)
            .await
            .expect("seen"),
        vec![false; 8],
        "partitions are isolated"
    );
    assert_eq!(
        s.seen_positions(OTHER_RANGES_PIPELINE, p, &probe)
            .await
            .expect("seen"),
        vec![false; 8],
        "pipelines are isolated"
    );
}

async fn last_mark_is_the_highest_live_end<S: DedupStore + ?Sized>(
    s: &S,
    p: &PartitionId,
    q: &PartitionId,
) {
    assert_eq!(
        last_mark(s, RANGES_PIPELINE, p).await,
        Some(Position::from(50u64)),
        "contract: the last marked position is the highest live range's end"
    );
    assert_eq!(
        last_mark(s, RANGES_PIPELINE, q).await,
        None,
        "partitions are isolated"
    );
    assert_eq!(
        last_mark(s, OTHER_RANGES_PIPELINE, p).await,
        None,
        "pipelines are isolated"
    );
}

/// Run after the short range (`40..=50`) outlived its TTL.
async fn expired_ranges_no_longer_count<S: DedupStore + ?Sized>(s: &S, p: &PartitionId) {
    assert_eq!(
        last_mark(s, RANGES_PIPELINE, p).await,
        Some(Position::from(30u64)),
        "contract: an expired range no longer counts as the last mark"
    );
    let seen = s
        .seen_positions(RANGES_PIPELINE, p, &positions(&[45, 15]))
        .await
        .expect("seen");
    assert_eq!(
        seen,
        vec![false, true],
        "contract: ranges expire after their TTL"
    );
}

/// A replayed, smaller batch inside an earlier range, then an overlapping one: the union
/// stays marked.
async fn nested_and_overlapping_ranges_keep_their_union<S: DedupStore + ?Sized>(
    s: &S,
    p: &PartitionId,
) {
    let ttl = Duration::from_secs(60);
    s.mark_ranges(RANGES_PIPELINE, &[range(p, 100, 200)], ttl)
        .await
        .expect("mark");
    s.mark_ranges(RANGES_PIPELINE, &[range(p, 150, 160)], ttl)
        .await
        .expect("mark nested");
    s.mark_ranges(RANGES_PIPELINE, &[range(p, 190, 250)], ttl)
        .await
        .expect("mark overlapping");
    let probe = positions(&[99, 100, 170, 199, 230, 250, 251]);
    assert_eq!(
        s.seen_positions(RANGES_PIPELINE, p, &probe)
            .await
            .expect("seen"),
        vec![false, true, true, true, true, true, false],
        "contract: nested and overlapping ranges keep their union marked"
    );
    assert_eq!(
        last_mark(s, RANGES_PIPELINE, p).await,
        Some(Position::from(250u64))
    );
}

/// Positions wider than 64 bits (Kinesis sequence numbers) are marked and compared whole.
async fn positions_beyond_u64_are_marked<S: DedupStore + ?Sized>(s: &S, q: &PartitionId) {
    let big = Position::parse_decimal("49590338271490256608559692538361571095921575989136588898")
        .expect("decimal");
    let bigger = big.successor();
    s.mark_ranges(
        RANGES_PIPELINE,
        &[PositionRange {
            partition: q.clone(),
            first: big.clone(),
            last: big.clone(),
        }],
        Duration::from_secs(60),
    )
    .await
    .expect("mark big");
    assert_eq!(last_mark(s, RANGES_PIPELINE, q).await, Some(big.clone()));
    assert_eq!(
        s.seen_positions(RANGES_PIPELINE, q, &[big, bigger])
            .await
            .expect("seen"),
        vec![true, false]
    );
}
