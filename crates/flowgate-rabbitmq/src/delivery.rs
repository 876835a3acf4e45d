//! What the RabbitMQ source's connection task and `next()` share: the buffer of deliveries
//! (bounded by the prefetch), the live channel, and the delivery tags already
//! settled; and turning a delivery's AMQP properties into a record's parts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use flowgate_core::Record;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::types::AMQPValue;

/// The channel currently consuming, and its epoch (one per connection).
#[derive(Clone)]
pub(crate) struct Live {
    pub(crate) epoch: u64,
    pub(crate) channel: Channel,
}

/// What the connection task buffers for `next()` (inside the source's
/// [`SourceInbox`](flowgate_core::SourceInbox), with its events and error).
#[derive(Default)]
pub(crate) struct DeliveryBuffer {
    pub(crate) buf: VecDeque<Record>,
    pub(crate) live: Option<Live>,
    /// Streams: stream offset → (epoch, delivery tag) of deliveries not yet acknowledged.
    pub(crate) tags: BTreeMap<u64, (u64, u64)>,
    /// Streams: the newest offset delivered by the broker.
    pub(crate) last_offset: Option<u64>,
    /// Queues: the delivery tags of the live channel already settled.
    pub(crate) settled: Settled,
}

/// Delivery tags of one channel already settled, so that no ack or nack names one again: the
/// broker closes the channel on an unknown delivery tag (an ack with `multiple` up to a tag
/// that was rejected on its own is one).
#[derive(Default, Debug)]
pub(crate) struct Settled {
    pub(crate) epoch: u64,
    /// Every tag up to this one is settled.
    pub(crate) through: u64,
    /// Tags above `through` rejected one by one (poison records).
    pub(crate) rejected: BTreeSet<u64>,
}

impl Settled {
    /// The tag to ack with `multiple` so that everything up to `tag` is settled: `tag` itself,
    /// or the last one below it not rejected; `None` if nothing is left to ack.
    pub(crate) fn ack_through(&mut self, epoch: u64, tag: u64) -> Option<u64> {
        self.follow(epoch);
        let from = self.through;
        if tag <= from {
            return None;
        }
        let mut t = tag;
        while t > from && self.rejected.contains(&t) {
            t -= 1;
        }
        self.through = tag;
        self.rejected = self.rejected.split_off(&(tag + 1));
        (t > from).then_some(t)
    }

    /// Whether `tag` may still be rejected (it is not settled); records it as settled.
    pub(crate) fn reject(&mut self, epoch: u64, tag: u64) -> bool {
        self.follow(epoch);
        tag > self.through && self.rejected.insert(tag)
    }

    /// A new channel numbers its deliveries from 1 again.
    fn follow(&mut self, epoch: u64) {
        if self.epoch != epoch {
            *self = Settled {
                epoch,
                ..Settled::default()
            };
        }
    }
}

/// A stream delivery's offset (its `x-stream-offset` header).
pub(crate) fn stream_offset(d: &Delivery) -> Option<u64> {
    match d
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-stream-offset")?
    {
        AMQPValue::LongLongInt(o) => u64::try_from(*o).ok(),
        _ => None,
    }
}

/// A header value as bytes (strings as is, numbers and booleans as text).
pub(crate) fn value_bytes(v: &AMQPValue) -> Option<Bytes> {
    Some(match v {
        AMQPValue::LongString(s) => Bytes::copy_from_slice(s.as_bytes()),
        AMQPValue::ShortString(s) => Bytes::copy_from_slice(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => Bytes::copy_from_slice(b.as_slice()),
        AMQPValue::Boolean(b) => Bytes::from(b.to_string()),
        AMQPValue::ShortShortInt(n) => Bytes::from(n.to_string()),
        AMQPValue::ShortShortUInt(n) => Bytes::from(n.to_string()),
        AMQPValue::ShortInt(n) => Bytes::from(n.to_string()),
        AMQPValue::ShortUInt(n) => Bytes::from(n.to_string()),
        AMQPValue::LongInt(n) => Bytes::from(n.to_string()),
        AMQPValue::LongUInt(n) => Bytes::from(n.to_string()),
        AMQPValue::LongLongInt(n) => Bytes::from(n.to_string()),
        AMQPValue::Timestamp(n) => Bytes::from(n.to_string()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::Settled;

    #[test]
    fn no_ack_or_nack_names_a_settled_tag() {
        let mut s = Settled::default();
        assert!(s.reject(1, 5), "poison record 5 rejected");
        // Everything up to 5 is done: ack through 4, since 5 is no longer outstanding.
        assert_eq!(s.ack_through(1, 5), Some(4));
        assert_eq!(
            s.ack_through(1, 5),
            None,
            "the same checkpoint again: nothing to ack"
        );
        assert!(!s.reject(1, 3), "already acked");
        assert!(s.reject(1, 7));
        assert!(s.reject(1, 6));
        assert_eq!(s.ack_through(1, 7), None, "6 and 7 were both rejected");
        assert_eq!(s.ack_through(1, 9), Some(9));
        // A new channel numbers its deliveries from 1 again.
        assert_eq!(s.ack_through(2, 3), Some(3));
        assert!(s.reject(2, 4));
    }
}
