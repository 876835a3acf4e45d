use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use flowgate_core::{
    Assignment, Checkpoint, Error, PartitionId, Record, Sink, SinkCapabilities, Source,
    SourceCapabilities, SourceContext, SourceEvent, StartPosition, WriteError,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A replayable source over records held in memory (grouped by their partition, in order).
/// Ends when everything was delivered. Commits are recorded for inspection.
pub struct MemorySource {
    partitions: BTreeMap<PartitionId, Vec<Record>>,
    pending: BTreeMap<PartitionId, VecDeque<Record>>,
    ctx: Option<SourceContext>,
    assigned_sent: bool,
    commits: Arc<Mutex<Vec<Checkpoint>>>,
    end: bool,
    rr: usize,
    fence: Option<u64>,
}

impl MemorySource {
    /// A source over these records.
    pub fn new(records: impl IntoIterator<Item = Record>) -> Self {
        let mut partitions: BTreeMap<PartitionId, Vec<Record>> = BTreeMap::new();
        for r in records {
            partitions.entry(r.partition.clone()).or_default().push(r);
        }
        for v in partitions.values_mut() {
            v.sort_by(|a, b| a.position.cmp(&b.position));
        }
        MemorySource {
            partitions,
            pending: BTreeMap::new(),
            ctx: None,
            assigned_sent: false,
            commits: Default::default(),
            end: true,
            rr: 0,
            fence: None,
        }
    }

    /// Keep running (no `End`) once everything was delivered.
    pub fn endless(mut self) -> Self {
        self.end = false;
        self
    }

    /// Hands out its partitions with this ownership epoch, as a broker generation or a lease
    /// would.
    pub fn with_fence(mut self, fence: u64) -> Self {
        self.fence = Some(fence);
        self
    }

    /// Every checkpoint committed to this source, in order.
    pub fn commits(&self) -> Arc<Mutex<Vec<Checkpoint>>> {
        self.commits.clone()
    }
}

#[async_trait]
impl Source for MemorySource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::replayable_ordered()
    }

    async fn open(&mut self, ctx: SourceContext) -> Result<(), Error> {
        self.ctx = Some(ctx);
        Ok(())
    }

    async fn next(&mut self) -> Result<SourceEvent, Error> {
        let Some(ctx) = self.ctx.clone() else {
            return Err(Error::fatal("MemorySource::next before open"));
        };
        if !self.assigned_sent {
            self.assigned_sent = true;
            return Ok(SourceEvent::Assigned(
                self.partitions
                    .keys()
                    .map(|p| Assignment {
                        fence: self.fence,
                        ..Assignment::new(p.clone())
                    })
                    .collect(),
            ));
        }
        loop {
            let changed = ctx.credits.changed();
            // Serve partitions in turn, so one partition cannot starve the others.
            let count = self.pending.len();
            for i in 0..count {
                let ix = (self.rr + i) % count.max(1);
                let Some((p, q)) = self.pending.iter_mut().nth(ix) else {
                    continue;
                };
                let n = ctx.credits.available(p).min(q.len()).min(512);
                if n > 0 {
                    self.rr = ix + 1;
                    return Ok(SourceEvent::Records(q.drain(..n).collect()));
                }
            }
            let started_all = self.pending.len() == self.partitions.len();
            if self.end && started_all && self.pending.values().all(VecDeque::is_empty) {
                return Ok(SourceEvent::End);
            }
            changed.await;
        }
    }

    async fn start(&mut self, starts: Vec<StartPosition>) -> Result<(), Error> {
        for s in starts {
            let records = self
                .partitions
                .get(&s.partition)
                .cloned()
                .unwrap_or_default();
            let q = records
                .into_iter()
                .filter(|r| s.after.as_ref().is_none_or(|a| r.position > *a))
                .collect();
            self.pending.insert(s.partition, q);
        }
        Ok(())
    }

    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), Error> {
        lock(&self.commits).extend_from_slice(checkpoints);
        Ok(())
    }

    async fn close(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// Collects written records in memory. Clones share the records.
#[derive(Clone, Default)]
pub struct MemorySink {
    records: Arc<Mutex<Vec<Record>>>,
}

impl MemorySink {
    /// A new, empty sink.
    pub fn new() -> Self {
        MemorySink::default()
    }

    /// A copy of everything written, in write order.
    pub fn records(&self) -> Vec<Record> {
        lock(&self.records).clone()
    }

    /// Number of records written.
    pub fn len(&self) -> usize {
        lock(&self.records).len()
    }

    /// True if nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl Sink for MemorySink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::basic().with_forwards_idempotency_key(true)
    }

    async fn write(&self, batch: &[Record]) -> Result<(), WriteError> {
        lock(&self.records).extend_from_slice(batch);
        Ok(())
    }
}
