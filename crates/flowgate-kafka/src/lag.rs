//! Lag of a Kafka partition: records between its high watermark and the next offset the
//! source hands to the runtime, sampled about once a second on the lag reader's thread
//! (`LagSample { unit: Records }`). The runtime adds what it received and has not committed,
//! so its lag is the committed view `kafka-consumer-groups --describe` shows.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flowgate_core::SourceInbox;
use flowgate_core::{
    Checkpoint, Connection, Error, LagSample, LagUnit, PartitionId, PartitionView, Position,
    SourceEvent,
};
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::client::records::{Key, partition_id};
use crate::error::map;
use crate::rebalance::{ConsumerState, PROBE_TIMEOUT, lock};
use backon::{BlockingRetryable, ExponentialBuilder};

/// Records behind the high watermark, from the next offset to hand out: an offset, or a
/// partition that has delivered nothing yet and starts at the beginning (the low watermark) or
/// the end. `None` while librdkafka alone knows where the partition starts.
pub(crate) fn records_behind(low_watermark: i64, high_watermark: i64, next: Offset) -> Option<u64> {
    let next = match next {
        Offset::Offset(o) => o,
        Offset::Beginning => low_watermark,
        Offset::End => high_watermark,
        _ => return None,
    };
    Some((high_watermark - next).max(0) as u64)
}

/// How long one broker request of the lag reader may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the reader waits for the first record after each committed position.
const TIMESTAMP_WAIT: Duration = Duration::from_secs(5);

/// Reads `topics`' partitions as the group `group` sees them, without joining it: committed
/// offsets, watermarks, the members holding each partition, and the timestamp of the first
/// record after each start position (`after`, else the group's committed offset, else
/// `auto.offset.reset`). Blocking: call it off the async runtime.
pub(crate) fn inspect(
    cc: &ClientConfig,
    topics: &[String],
    group: &str,
    earliest: bool,
    checkpoints: &[Checkpoint],
) -> Result<Vec<PartitionView>, Error> {
    let consumer: BaseConsumer = cc.create().map_err(|e| map(e, "creating the lag reader"))?;
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(|e| map(e, "reading the topic's partitions"))?;
        for t in md.topics() {
            if let Some(e) = t.error() {
                return Err(
                    Error::config(format!("kafka: topic {topic:?} cannot be read"))
                        .with_context("cause", format!("{e:?}"))
                        .with_context("key", "source.topics"),
                );
            }
            for p in t.partitions() {
                tpl.add_partition(t.name(), p.id());
            }
        }
    }
    // A group the brokers have not seen yet has no coordinator for a moment: its first lookup
    // answers `NotCoordinator`, which a retry or two resolves.
    let committed = (|| consumer.committed_offsets(tpl.clone(), REQUEST_TIMEOUT))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_times(6),
        )
        .sleep(std::thread::sleep)
        .when(is_temporary)
        .call()
        .map_err(|e| map(e, "reading the group's committed offsets"))?;
    let owners = owners(&consumer, group);
    let from: HashMap<&PartitionId, &Position> = checkpoints
        .iter()
        .map(|c| (&c.partition, &c.position))
        .collect();
    let mut views = Vec::new();
    let mut seek = TopicPartitionList::new();
    for e in committed.elements() {
        let (topic, p) = (e.topic().to_string(), e.partition());
        let id = partition_id(&topic, p);
        let (low, high) = consumer
            .fetch_watermarks(&topic, p, REQUEST_TIMEOUT)
            .map_err(|e| map(e, "reading the partition's watermarks"))?;
        let group_offset = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        let next = from
            .get(&id)
            .and_then(|pos| pos.successor().as_offset())
            .or(group_offset)
            .unwrap_or(if earliest { low } else { high })
            .max(low);
        let lag = (high - next).max(0) as u64;
        if lag > 0 {
            seek.add_partition_offset(&topic, p, Offset::Offset(next))
                .map_err(|e| map(e, "choosing where to read the first record behind"))?;
        }
        views.push(PartitionView {
            broker_committed: group_offset.and_then(|o| Position::from_offset(o - 1)),
            end: Position::from_offset(high - 1),
            lag_records: Some(lag),
            lag_seconds: (lag == 0).then_some(0.0),
            owner: owners.get(&(topic, p)).cloned(),
            partition: id,
        });
    }
    if seek.count() > 0 {
        let ages = first_record_ages(cc, &seek)?;
        for v in &mut views {
            if let Some(age) = ages.get(&v.partition) {
                v.lag_seconds = Some(*age);
            }
        }
    }
    Ok(views)
}

fn is_temporary(e: &rdkafka::error::KafkaError) -> bool {
    map(e.clone(), "").is_temporary()
}

/// Seconds since the broker timestamp of the record at each partition's offset in `seek`,
/// read by an assigned (not subscribed) consumer that commits nothing.
fn first_record_ages(
    cc: &ClientConfig,
    seek: &TopicPartitionList,
) -> Result<HashMap<PartitionId, f64>, Error> {
    let mut cc = cc.clone();
    cc.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.max.bytes", "1048576")
        .set("max.partition.fetch.bytes", "65536");
    let reader: BaseConsumer = cc.create().map_err(|e| map(e, "creating the lag reader"))?;
    reader
        .assign(seek)
        .map_err(|e| map(e, "assigning the lag reader"))?;
    let mut waiting: HashSet<(String, i32)> = seek
        .elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect();
    let mut ages = HashMap::new();
    let deadline = Instant::now() + TIMESTAMP_WAIT;
    while !waiting.is_empty() && Instant::now() < deadline {
        let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) else {
            continue;
        };
        if !waiting.remove(&(m.topic().to_string(), m.partition())) {
            continue;
        }
        if let Some(ts) = m.timestamp().to_millis() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            ages.insert(
                partition_id(m.topic(), m.partition()),
                (now - ts).max(0) as f64 / 1000.0,
            );
        }
    }
    Ok(ages)
}

/// The group's members and the partitions each holds (classic protocol: the member
/// assignment in the consumer protocol's layout). Empty when the group is unknown or the
/// broker does not say.
fn owners(consumer: &BaseConsumer, group: &str) -> HashMap<(String, i32), String> {
    let mut owners = HashMap::new();
    let Ok(list) = consumer.fetch_group_list(Some(group), REQUEST_TIMEOUT) else {
        return owners;
    };
    for g in list.groups() {
        for m in g.members() {
            let who = format!(
                "{}@{}",
                m.client_id(),
                m.client_host().trim_start_matches('/')
            );
            for key in m.assignment().map(parse_assignment).unwrap_or_default() {
                owners.insert(key, who.clone());
            }
        }
    }
    owners
}

/// The partitions of a consumer protocol assignment: version (i16), then for each topic its
/// name (i16 length + bytes) and partitions (i32 count + i32 each).
fn parse_assignment(bytes: &[u8]) -> Vec<(String, i32)> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Some(head)
    }
    fn i16_of(b: &mut &[u8]) -> Option<i16> {
        take(b, 2).map(|x| i16::from_be_bytes([x[0], x[1]]))
    }
    fn i32_of(b: &mut &[u8]) -> Option<i32> {
        take(b, 4).map(|x| i32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    }
    let mut out = Vec::new();
    let mut b = bytes;
    let parse = |b: &mut &[u8], out: &mut Vec<(String, i32)>| -> Option<()> {
        i16_of(b)?;
        for _ in 0..i32_of(b)?.max(0) {
            let len = i16_of(b)?.max(0) as usize;
            let topic = String::from_utf8_lossy(take(b, len)?).into_owned();
            for _ in 0..i32_of(b)?.max(0) {
                out.push((topic.clone(), i32_of(b)?));
            }
        }
        Some(())
    };
    let _ = parse(&mut b, &mut out);
    out
}

/// Samples lag once a second on a thread of its own, through the unsubscribed helper
/// client, so a slow `ListOffsets` answer never holds up the poll thread. The same answers
/// tell whether the brokers can be reached: librdkafka reports "all brokers down" once and then
/// retries silently, so without this an unreachable cluster looked like an idle topic.
pub(crate) struct LagReader {
    pub(crate) helper: Arc<Mutex<Option<BaseConsumer>>>,
    pub(crate) topics: Vec<String>,
    /// The bootstrap servers, named in the connection events.
    pub(crate) endpoint: String,
    /// The last reachability reported (`None` before the first probe).
    pub(crate) reachable: Mutex<Option<bool>>,
    pub(crate) inbox: Arc<SourceInbox<ConsumerState>>,
    pub(crate) closing: Arc<AtomicBool>,
}

impl LagReader {
    pub(crate) fn run(&self) {
        self.warm_up();
        let mut last = Instant::now();
        while !self.closing.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
            // Serve the helper's own queue (logs, errors), which nothing else polls: it would
            // grow for as long as the brokers stay away.
            if let Some(h) = lock(&self.helper).as_ref() {
                let _ = h.poll(Duration::ZERO);
            }
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                self.sample();
            }
        }
    }

    /// Connects the helper to the group coordinator while the consumer joins the group: the
    /// assignment callback reads the committed offsets through it, and a cold helper first
    /// looks the coordinator up (~60 ms here) while the group waits for the callback. Bounded
    /// by 2 s: a close meanwhile waits for it (the helper is behind the same lock).
    pub(crate) fn warm_up(&self) {
        let mut tpl = TopicPartitionList::new();
        for t in &self.topics {
            tpl.add_partition(t, 0);
        }
        if let Some(h) = lock(&self.helper).as_ref() {
            if let Err(e) = h.committed_offsets(tpl, Duration::from_secs(2)) {
                tracing::debug!(error = %e, "kafka: warming up the offsets reader failed; the assignment reads them cold");
            }
        }
    }

    /// Records behind the high watermark, per partition; with nothing assigned, a metadata
    /// request stands in as the reachability probe.
    pub(crate) fn sample(&self) {
        let parts: Vec<(Key, PartitionId, Offset)> = self
            .inbox
            .buffered()
            .parts
            .iter()
            .map(|p| (p.key.clone(), p.id.clone(), p.next_offset))
            .collect();
        let mut samples = Vec::new();
        let mut failure = None;
        if parts.is_empty() {
            let probe = match lock(&self.helper).as_ref() {
                Some(h) => h
                    .fetch_metadata(self.topics.first().map(String::as_str), PROBE_TIMEOUT)
                    .map(|_| ()),
                None => return,
            };
            failure = probe.err();
        }
        for ((t, p), id, next) in parts {
            if self.closing.load(Ordering::Acquire) {
                return;
            }
            let watermarks = match lock(&self.helper).as_ref() {
                Some(h) => h.fetch_watermarks(&t, p, PROBE_TIMEOUT),
                None => return,
            };
            match watermarks {
                Ok((low, high)) => {
                    if let Some(lag) = crate::lag::records_behind(low, high, next) {
                        samples.push(LagSample {
                            partition: id,
                            lag,
                            unit: LagUnit::Records,
                        });
                    }
                }
                // The brokers are away: one failure says so, without waiting out the timeout
                // once per partition while the helper's lock is held.
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let reachable = !samples.is_empty() || failure.is_none();
        let changed = lock(&self.reachable).replace(reachable) != Some(reachable);
        let client_error = {
            let mut sh = self.inbox.buffered();
            if reachable {
                sh.client_error = None;
                sh.client_log = None;
            }
            sh.client_error.clone()
        };
        if changed {
            let event = if reachable {
                Connection::Up
            } else {
                Connection::Down {
                    endpoint: self.endpoint.clone(),
                    // librdkafka's own word on the connection is clearer than a timeout.
                    cause: client_error
                        .unwrap_or_else(|| failure.map_or_else(String::new, |e| e.to_string())),
                }
            };
            self.inbox.push_event(SourceEvent::Connection(event));
        }
        if !samples.is_empty() {
            self.inbox.push_event(SourceEvent::Lag(samples));
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::Offset;

    #[test]
    fn reads_the_consumer_protocol_assignment() {
        // version 1; 1 topic "t" with partitions 0 and 3; empty user data.
        let bytes = [
            0, 1, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff,
            0xff,
        ];
        assert_eq!(
            super::parse_assignment(&bytes),
            vec![("t".to_string(), 0), ("t".to_string(), 3)]
        );
        // Truncated: what could be read, nothing invented.
        assert_eq!(super::parse_assignment(&bytes[..11]), vec![]);
    }

    #[test]
    fn counts_from_the_next_offset_or_the_logical_start() {
        assert_eq!(super::records_behind(0, 10, Offset::Offset(4)), Some(6));
        assert_eq!(super::records_behind(0, 3, Offset::Offset(7)), Some(0));
        // An idle partition that starts at the end lags by nothing, not by its whole length.
        assert_eq!(super::records_behind(2, 500, Offset::End), Some(0));
        assert_eq!(super::records_behind(2, 500, Offset::Beginning), Some(498));
        assert_eq!(super::records_behind(0, 500, Offset::Invalid), None);
    }
}
