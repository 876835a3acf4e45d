//! Source conformance.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::{
    Checkpoint, Credits, Error, PartitionId, Position, Record, Source, SourceContext, SourceEvent,
    StartPosition,
};

/// Prepares data for a source under test and opens sources over it.
#[async_trait]
pub trait SourceHarness: Send + Sync {
    /// The source type.
    type Source: Source;

    /// Makes `per_partition` records available in each partition (produce to the topic,
    /// publish to the queue, PutRecords…) and returns the partitions. Called once per test,
    /// each time on a fresh topic/queue/stream.
    async fn prepare(&self, per_partition: usize) -> Result<Vec<PartitionId>, Error>;

    /// A new source over the prepared data. Successive sources of one test share the
    /// consumer identity (group, queue, lease owner) so commits carry over.
    async fn open_source(&self) -> Result<Self::Source, Error>;
}

/// How long a conformance step waits for records before failing.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A minimal driver that plays the runtime's part: answers assignments, accounts credit.
pub struct Driver<S: Source> {
    /// The source under test.
    pub source: S,
    /// The credit table the source reads.
    pub credits: Credits,
    /// Partitions assigned so far.
    pub assigned: Vec<PartitionId>,
    /// Start positions to answer assignments with (`None`: the source's default).
    pub starts: BTreeMap<PartitionId, Position>,
    credit_per_partition: usize,
    /// The newest position delivered per partition.
    delivered: BTreeMap<PartitionId, Position>,
}

impl<S: Source> Driver<S> {
    /// Opens the source with `credit` records of credit per partition, which is also the
    /// most the runtime would hold in flight per partition.
    pub async fn open(mut source: S, credit: usize) -> Self {
        let credits = Credits::new();
        source
            .open(
                SourceContext::new("conformance", credits.clone())
                    .with_max_in_flight_per_partition(credit),
            )
            .await
            .expect("Source::open must succeed against a reachable broker");
        Driver {
            source,
            credits,
            assigned: Vec::new(),
            starts: BTreeMap::new(),
            credit_per_partition: credit,
            delivered: BTreeMap::new(),
        }
    }

    /// Polls the source once (bounded by `wait`), handling non-record events. Returns the
    /// records delivered, `None` at `End` or when `wait` passed without an event.
    pub async fn poll(&mut self, wait: Duration) -> Option<Vec<Record>> {
        let event = match tokio::time::timeout(wait, self.source.next()).await {
            Ok(ev) => ev.expect("Source::next must not fail against a healthy broker"),
            Err(_) => return Some(Vec::new()),
        };
        match event {
            SourceEvent::Records(records) => {
                for r in &records {
                    let have = self.credits.available(&r.partition);
                    assert!(
                        have > 0 || !self.credits.is_open(),
                        "contract: a source MUST NOT deliver records for a partition without credit \
                         (partition {}, position {})",
                        r.partition,
                        r.position
                    );
                    self.credits.set(&r.partition, have.saturating_sub(1));
                    self.delivered
                        .insert(r.partition.clone(), r.position.clone());
                }
                Some(records)
            }
            SourceEvent::Assigned(assignments) => {
                let mut starts = Vec::new();
                for a in assignments {
                    self.credits.set(&a.partition, self.credit_per_partition);
                    self.assigned.push(a.partition.clone());
                    let after = self.starts.get(&a.partition).cloned();
                    starts.push(StartPosition {
                        partition: a.partition,
                        after,
                    });
                }
                self.source
                    .start(starts)
                    .await
                    .expect("Source::start must accept assigned partitions");
                Some(Vec::new())
            }
            SourceEvent::Revoked(rev) => {
                for p in &rev.partitions {
                    self.credits.remove(p);
                    self.assigned.retain(|a| a != p);
                }
                rev.complete(Vec::new());
                Some(Vec::new())
            }
            SourceEvent::Lag(_) | SourceEvent::Connection(_) => Some(Vec::new()),
            SourceEvent::End => None,
        }
    }

    /// Grants `credit` more records to every assigned partition, as the runtime does once
    /// records are done. For a source that declares `eager_commit` (its broker ties delivery
    /// to acknowledgements), what was delivered is committed first, as the runtime would.
    pub async fn grant_all(&mut self, credit: usize) {
        if self.source.capabilities().eager_commit {
            let done: Vec<Checkpoint> = self
                .delivered
                .iter()
                .map(|(p, pos)| Checkpoint::new(p.clone(), pos.clone()))
                .collect();
            self.source
                .commit(&done)
                .await
                .expect("Source::commit of delivered records");
        }
        for p in &self.assigned {
            let have = self.credits.available(p);
            self.credits.set(p, have + credit);
        }
    }

    /// Reads until `want` records per partition arrived (or `End`), failing after
    /// [`STEP_TIMEOUT`].
    pub async fn read_until(
        &mut self,
        partitions: &[PartitionId],
        want: usize,
    ) -> BTreeMap<PartitionId, Vec<Record>> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut got: BTreeMap<PartitionId, Vec<Record>> =
            partitions.iter().map(|p| (p.clone(), Vec::new())).collect();
        while got.values().any(|v| v.len() < want) {
            assert!(
                Instant::now() < deadline,
                "contract: the source delivered {:?} records per partition within {STEP_TIMEOUT:?}, expected {want}",
                got.iter()
                    .map(|(p, v)| (p.to_string(), v.len()))
                    .collect::<Vec<_>>()
            );
            match self.poll(Duration::from_millis(500)).await {
                Some(records) => {
                    for r in records {
                        got.entry(r.partition.clone()).or_default().push(r);
                    }
                }
                None => break,
            }
        }
        got
    }

    /// Closes the source, which must happen within 30 s.
    pub async fn close(mut self) {
        tokio::time::timeout(Duration::from_secs(30), self.source.close())
            .await
            .expect("contract: Source::close MUST return within a bounded time (30 s here)")
            .expect("Source::close must succeed");
    }
}

/// Every prepared record is delivered exactly once per partition, in position order when the
/// source declares `ordered_per_partition`.
pub async fn delivers_everything_in_order<H: SourceHarness>(h: &H) {
    let n = 200;
    let partitions = h.prepare(n).await.expect("prepare");
    let source = h.open_source().await.expect("open_source");
    let ordered = source.capabilities().ordered_per_partition;
    let mut d = Driver::open(source, n * 2).await;
    let got = d.read_until(&partitions, n).await;
    for (p, records) in &got {
        assert_eq!(
            records.len(),
            n,
            "partition {p}: every prepared record must be delivered once"
        );
        let mut positions: Vec<_> = records.iter().map(|r| r.position.clone()).collect();
        if ordered {
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "contract: records of partition {p} MUST arrive in strictly increasing position order"
            );
        }
        positions.sort();
        positions.dedup();
        assert_eq!(
            positions.len(),
            n,
            "partition {p}: positions must be unique"
        );
        assert!(records.iter().all(|r| &r.partition == p));
    }
    d.close().await;
}

/// With `k` records of credit and no acknowledgements, a source delivers exactly `k` per
/// partition and stops; granting more resumes delivery.
pub async fn respects_credit<H: SourceHarness>(h: &H) {
    let n = 100;
    let k = 7;
    let partitions = h.prepare(n).await.expect("prepare");
    let source = h.open_source().await.expect("open_source");
    let mut d = Driver::open(source, k).await;
    let got = d.read_until(&partitions, k).await;
    // Give the source time to overshoot if it is going to.
    let settle = Instant::now() + Duration::from_secs(2);
    let mut extra = 0usize;
    while Instant::now() < settle {
        match d.poll(Duration::from_millis(200)).await {
            Some(records) => extra += records.len(),
            None => break,
        }
    }
    for (p, records) in &got {
        assert_eq!(
            records.len(),
            k,
            "partition {p}: with credit {k} the source must deliver exactly {k}"
        );
    }
    assert_eq!(
        extra, 0,
        "contract: a source MUST stop delivering when credit is exhausted"
    );
    d.grant_all(k).await;
    let more = d.read_until(&partitions, k).await;
    for (p, records) in &more {
        assert_eq!(
            records.len(),
            k,
            "partition {p}: granting credit must resume delivery"
        );
        let last_before = got[p].last().map(|r| r.position.clone());
        assert!(
            records[0].position > last_before.unwrap_or(Position::ZERO),
            "resumed where it stopped"
        );
    }
    d.close().await;
}

/// A replayable source started after position `P` delivers from the record after `P`, and a
/// committed position survives a new source (when the broker keeps commits).
pub async fn resumes_after_position<H: SourceHarness>(h: &H) {
    let n = 50;
    let partitions = h.prepare(n).await.expect("prepare");
    let source = h.open_source().await.expect("open_source");
    if !source.capabilities().replayable {
        return;
    }
    let mut d = Driver::open(source, n * 2).await;
    let first = d.read_until(&partitions, n).await;
    let cut = 20;
    let commits: Vec<Checkpoint> = first
        .iter()
        .map(|(p, rs)| Checkpoint::new(p.clone(), rs[cut - 1].position.clone()))
        .collect();
    d.source
        .commit(&commits)
        .await
        .expect("Source::commit must accept delivered positions");
    d.close().await;

    let source = h.open_source().await.expect("open_source");
    let mut d = Driver::open(source, n * 2).await;
    d.starts = commits
        .iter()
        .map(|c| (c.partition.clone(), c.position.clone()))
        .collect();
    let second = d.read_until(&partitions, n - cut).await;
    for (p, rs) in &second {
        assert_eq!(
            rs[0].position, first[p][cut].position,
            "contract: a source started after P MUST deliver the record after P first (partition {p})"
        );
        assert_eq!(rs.len(), n - cut, "partition {p}");
    }
    d.close().await;
}

/// Runs every source conformance check.
pub async fn run_all<H: SourceHarness>(h: &H) {
    delivers_everything_in_order(h).await;
    respects_credit(h).await;
    resumes_after_position(h).await;
}
