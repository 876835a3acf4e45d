//! What a source's background tasks (a poll thread, a connection task, shard readers) hand to
//! its `next()`: events in order, a fatal error, the source's own buffered state, and one
//! wake-up. Every broker source has this shape behind a cancel-safe `next()`; it is written
//! once here.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::{Credits, Error, Record, SourceEvent};

/// A source's events, fatal error and buffered state `S`, shared by its tasks and `next()`.
///
/// ```
/// use std::collections::VecDeque;
/// use std::time::Duration;
/// use flowgate_core::{Credits, PartitionId, Position, Record, SourceEvent, SourceInbox};
///
/// # async fn demo() -> Result<(), flowgate_core::Error> {
/// let p = PartitionId::new("q");
/// let inbox = SourceInbox::new(VecDeque::<Record>::new());
/// // The connection task:
/// inbox.with(|buf| buf.push_back(Record::new(p.clone(), Position::ZERO, bytes::Bytes::from_static(b"hi"))));
/// inbox.wake();
/// // `next()`:
/// let credits = Credits::new();
/// credits.set(&p, 10);
/// let ev = inbox
///     .next(&credits, Duration::from_millis(200), |buf, credits| {
///         let n = credits.available(&p).min(buf.len());
///         (n > 0).then(|| buf.drain(..n).collect())
///     })
///     .await?;
/// assert!(matches!(ev, SourceEvent::Records(r) if r.len() == 1));
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct SourceInbox<S> {
    state: Mutex<Inner<S>>,
    wake: Notify,
}

/// The locked buffered state of a [`SourceInbox`].
pub struct Buffered<'a, S>(MutexGuard<'a, Inner<S>>);

impl<S> std::ops::Deref for Buffered<'_, S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0.buffered
    }
}

impl<S> std::ops::DerefMut for Buffered<'_, S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.0.buffered
    }
}

#[derive(Debug, Default)]
struct Inner<S> {
    events: VecDeque<SourceEvent>,
    error: Option<Error>,
    buffered: S,
}

impl<S> SourceInbox<S> {
    /// An empty inbox around the source's buffered state.
    pub fn new(buffered: S) -> Self {
        SourceInbox {
            state: Mutex::new(Inner {
                events: VecDeque::new(),
                error: None,
                buffered,
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues an event for `next()` (after those queued before it) and wakes it.
    pub fn push_event(&self, event: SourceEvent) {
        self.lock().events.push_back(event);
        self.wake.notify_one();
    }

    /// Makes `next()` return `error` once every queued event is delivered (events pushed
    /// after it too). While an error waits to be returned, later ones are dropped (they follow
    /// from it); sources stop after returning one.
    pub fn fail(&self, error: Error) {
        {
            let mut inner = self.lock();
            if inner.error.is_none() {
                inner.error = Some(error);
            }
        }
        self.wake.notify_one();
    }

    /// Works on the buffered state under the inbox's lock (call [`wake`](Self::wake) after
    /// adding records).
    pub fn with<R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        f(&mut self.lock().buffered)
    }

    /// The buffered state, locked until the guard is dropped (hold it briefly; never across
    /// an `.await`).
    pub fn buffered(&self) -> Buffered<'_, S> {
        Buffered(self.lock())
    }

    /// Wakes `next()`: records arrived (or something else `take` looks at changed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A queued event, else the error, without waiting (`None`: neither).
    pub fn try_next(&self) -> Option<Result<SourceEvent, Error>> {
        let mut inner = self.lock();
        match inner.events.pop_front() {
            Some(event) => Some(Ok(event)),
            None => inner.error.take().map(Err),
        }
    }

    /// The next event, error or records: queued events first, in order; then the error; then
    /// whatever `take` finds within `credits` (`None`: nothing to hand over). Waits for a
    /// wake-up, a credit change, or `recheck` at the latest. Cancel-safe: nothing is taken
    /// from the inbox unless it is returned.
    pub async fn next(
        &self,
        credits: &Credits,
        recheck: Duration,
        mut take: impl FnMut(&mut S, &Credits) -> Option<Vec<Record>>,
    ) -> Result<SourceEvent, Error> {
        loop {
            let woken = self.wake.notified();
            let changed = credits.changed();
            {
                let mut inner = self.lock();
                if let Some(event) = inner.events.pop_front() {
                    return Ok(event);
                }
                if let Some(error) = inner.error.take() {
                    return Err(error);
                }
                if let Some(records) = take(&mut inner.buffered, credits) {
                    if !records.is_empty() {
                        return Ok(SourceEvent::Records(records));
                    }
                }
            }
            tokio::select! {
                _ = woken => {}
                _ = changed => {}
                _ = tokio::time::sleep(recheck) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::{PartitionId, Position};

    type Queues = BTreeMap<PartitionId, VecDeque<Record>>;

    fn take_within_credit(q: &mut Queues, credits: &Credits) -> Option<Vec<Record>> {
        let mut out = Vec::new();
        for (p, buf) in q.iter_mut() {
            let n = credits.available(p).min(buf.len());
            out.extend(buf.drain(..n));
        }
        Some(out)
    }

    #[derive(Clone, Debug)]
    enum Step {
        Records(u8, u8),
        Event,
        Credit(u8, u8),
        Next,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..3, 1u8..20).prop_map(|(p, n)| Step::Records(p, n)),
            Just(Step::Event),
            (0u8..3, 0u8..30).prop_map(|(p, c)| Step::Credit(p, c)),
            Just(Step::Next),
        ]
    }

    proptest! {
        /// Whatever the interleaving of producers, credit and `next()`: records come out in
        /// order per partition, never beyond the credit at the time, events in order and
        /// before later records, and nothing is lost once credit allows.
        #[test]
        fn records_within_credit_in_order_and_nothing_lost(steps in proptest::collection::vec(step(), 1..80)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let inbox = Arc::new(SourceInbox::new(Queues::new()));
                let credits = Credits::new();
                let parts: Vec<PartitionId> = (0..3).map(|i| PartitionId::new(format!("p{i}"))).collect();
                let mut produced: BTreeMap<PartitionId, u128> = BTreeMap::new();
                let mut delivered: BTreeMap<PartitionId, Vec<u128>> = BTreeMap::new();
                let (mut events_in, mut events_out) = (0usize, 0usize);
                for s in steps {
                    match s {
                        Step::Records(p, n) => {
                            let p = &parts[p as usize];
                            inbox.with(|q| {
                                let next = produced.entry(p.clone()).or_default();
                                for _ in 0..n {
                                    q.entry(p.clone()).or_default().push_back(Record::new(p.clone(), Position::new(*next), bytes::Bytes::from_static(b"x")));
                                    *next += 1;
                                }
                            });
                            inbox.wake();
                        }
                        Step::Event => {
                            inbox.push_event(SourceEvent::End);
                            events_in += 1;
                        }
                        Step::Credit(p, c) => credits.set(&parts[p as usize], c as usize),
                        Step::Next => {
                            let before: BTreeMap<PartitionId, usize> = parts.iter().map(|p| (p.clone(), credits.available(p))).collect();
                            let got = tokio::time::timeout(Duration::from_millis(50), inbox.next(&credits, Duration::from_millis(10), take_within_credit)).await;
                            match got {
                                Ok(Ok(SourceEvent::End)) => {
                                    events_out += 1;
                                }
                                Ok(Ok(SourceEvent::Records(rs))) => {
                                    prop_assert_eq!(events_out, events_in, "events before records");
                                    let mut per: BTreeMap<PartitionId, usize> = BTreeMap::new();
                                    for r in rs {
                                        *per.entry(r.partition.clone()).or_default() += 1;
                                        delivered.entry(r.partition.clone()).or_default().push(r.position.as_u128().unwrap());
                                    }
                                    for (p, n) in per {
                                        prop_assert!(n <= before[&p], "{} records for {} with credit {}", n, p, before[&p]);
                                        credits.set(&p, before[&p] - n);
                                    }
                                }
                                Ok(other) => prop_assert!(false, "unexpected {:?}", other.map(|_| ())),
                                Err(_) => {}
                            }
                        }
                    }
                }
                // Drain with ample credit: everything produced comes out, in order.
                for p in &parts { credits.set(p, 10_000); }
                while events_out < events_in {
                    if let Ok(SourceEvent::End) = inbox.next(&credits, Duration::from_millis(10), take_within_credit).await { events_out += 1; }
                }
                while produced.iter().any(|(p, n)| delivered.get(p).map_or(0, |d| d.len() as u128) < *n) {
                    if let Ok(SourceEvent::Records(rs)) = inbox.next(&credits, Duration::from_millis(10), take_within_credit).await {
                        for r in rs { delivered.entry(r.partition.clone()).or_default().push(r.position.as_u128().unwrap()); }
                    }
                }
                for (p, n) in &produced {
                    prop_assert_eq!(&delivered[p], &(0..*n).collect::<Vec<_>>());
                }
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn the_first_error_comes_after_the_events_before_it() {
        let inbox = SourceInbox::new(());
        let credits = Credits::new();
        inbox.push_event(SourceEvent::End);
        inbox.fail(Error::fatal("first"));
        inbox.fail(Error::fatal("second"));
        let none = |_: &mut (), _: &Credits| None;
        let recheck = Duration::from_millis(10);
        assert!(matches!(
            inbox.next(&credits, recheck, none).await,
            Ok(SourceEvent::End)
        ));
        let e = inbox.next(&credits, recheck, none).await.unwrap_err();
        assert_eq!(e.message(), "first");
    }
}
