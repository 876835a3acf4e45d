//! A partition's own librdkafka queue, read in batches.
//!
//! rust-rdkafka's `PartitionQueue::poll` takes one message per call, each call locking the
//! queue and reading the clock twice; at hundreds of thousands of records a second that is
//! a large share of the consumer's time. `rd_kafka_consume_batch_queue` takes up to a whole
//! batch under one lock. rust-rdkafka does not wrap it, hence this small unsafe module: every
//! pointer it touches is owned here (the queue handle) or lent by librdkafka for the duration
//! of one call (the messages, destroyed before `take` returns).
//!
//! It also reads the group's generation, which rust-rdkafka's `ConsumerGroupMetadata` keeps
//! private: the generation fences the checkpoints written for the partitions of an assignment.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_void};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use bytes::Bytes;
use flowgate_core::{Headers, PartitionId, Record};
use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

/// Called by librdkafka (from any of its threads) when the queue turns non-empty.
type Wake = Box<dyn Fn() + Send + Sync>;

/// The fetch queue of one assigned partition, split off the consumer's main queue.
pub(crate) struct PartitionFeed<C: ConsumerContext + 'static> {
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// Double box: librdkafka keeps a thin pointer to the (fat) closure pointer.
    wake: Option<Box<Wake>>,
    /// Keeps the client alive as long as the queue handle.
    _consumer: Arc<BaseConsumer<C>>,
}

// SAFETY: librdkafka queue handles may be used from any thread (every operation on them takes
// the queue's own lock); the wake closure is `Send + Sync`.
unsafe impl<C: ConsumerContext + 'static> Send for PartitionFeed<C> {}
// SAFETY: as above; `take` only calls thread-safe librdkafka functions.
unsafe impl<C: ConsumerContext + 'static> Sync for PartitionFeed<C> {}

unsafe extern "C" fn on_nonempty(_: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Box<Wake>` stored in the feed, alive until the callback is
    // disabled in `drop`.
    let wake = unsafe { &*(opaque as *const Wake) };
    wake();
}

impl<C: ConsumerContext + 'static> PartitionFeed<C> {
    /// Splits the partition's messages off the consumer's main queue; `wake` is called when
    /// the queue turns non-empty. `None` if librdkafka does not know the partition.
    pub(crate) fn split(
        consumer: &Arc<BaseConsumer<C>>,
        topic: &str,
        partition: i32,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> Option<Self> {
        let topic = CString::new(topic).ok()?;
        let rk = consumer.client().native_ptr();
        // SAFETY: `rk` is a live client (we hold an `Arc` on its consumer); the returned
        // handle is ours to destroy.
        let queue = NonNull::new(unsafe {
            rd::rd_kafka_queue_get_partition(rk, topic.as_ptr(), partition)
        })?;
        // SAFETY: `queue` is a valid handle; forwarding to null stops the forwarding to the
        // consumer's main queue.
        unsafe { rd::rd_kafka_queue_forward(queue.as_ptr(), ptr::null_mut()) };
        let wake: Box<Wake> = Box::new(Box::new(wake));
        // SAFETY: the opaque pointer stays valid until `drop` disables the callback.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(
                queue.as_ptr(),
                Some(on_nonempty),
                &*wake as *const Wake as *mut c_void,
            )
        };
        Some(PartitionFeed {
            queue,
            wake: Some(wake),
            _consumer: consumer.clone(),
        })
    }

    /// Appends up to `max` records of the partition to `out` without waiting; returns how
    /// many. Messages carrying an error are logged and skipped.
    ///
    /// The keys and payloads of the batch are copied into one buffer that the records share
    /// (one allocation per batch instead of two per record); it is freed with the last of
    /// them, and the records of a batch travel and settle together.
    pub(crate) fn take(&self, id: &PartitionId, max: usize, out: &mut Vec<Record>) -> usize {
        if max == 0 {
            return 0;
        }
        let mut msgs: Vec<*mut rd::rd_kafka_message_t> = vec![ptr::null_mut(); max.min(1024)];
        // SAFETY: `msgs` has room for `msgs.len()` pointers; librdkafka fills the first `n`.
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), 0, msgs.as_mut_ptr(), msgs.len())
        };
        let msgs = &msgs[..usize::try_from(n).unwrap_or(0)];
        // SAFETY (every block below): librdkafka handed us these valid messages; each is read
        // here and destroyed exactly once at the end, after its contents were copied.
        let usable: Vec<bool> = msgs.iter().map(|m| unsafe { usable(*m, id) }).collect();
        let good = || {
            msgs.iter()
                .zip(&usable)
                .filter(|(_, u)| **u)
                .map(|(m, _)| *m)
        };
        let total: usize = good()
            .map(|m| unsafe { lens(&*m) })
            .map(|(k, p)| k + p)
            .sum();
        let mut arena = Vec::with_capacity(total);
        for m in good() {
            // Key and payload point to `key_len` and `len` bytes owned by the message, or are
            // null.
            unsafe {
                let msg = &*m;
                arena.extend_from_slice(bytes_of(msg.key, msg.key_len).unwrap_or_default());
                arena.extend_from_slice(bytes_of(msg.payload, msg.len).unwrap_or_default());
            }
        }
        let arena = Bytes::from(arena);
        let mut at = 0;
        let before = out.len();
        out.reserve(msgs.len());
        for m in good() {
            if let Some(r) = unsafe { to_record(m, id, &arena, &mut at) } {
                out.push(r);
            }
        }
        for &m in msgs {
            unsafe { rd::rd_kafka_message_destroy(m) };
        }
        out.len() - before
    }
}

impl<C: ConsumerContext + 'static> Drop for PartitionFeed<C> {
    fn drop(&mut self) {
        // SAFETY: the handle is valid; the callback is disabled before its closure is freed,
        // and the handle is destroyed once.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(self.queue.as_ptr(), None, ptr::null_mut());
            rd::rd_kafka_queue_destroy(self.queue.as_ptr());
        }
        self.wake = None;
    }
}

/// The consumer group's current generation, as librdkafka knows it: the new generation while
/// a rebalance callback runs (the join answered before the assignment is handed out). `None`
/// outside a group (no join yet, or a generation librdkafka marks invalid).
pub(crate) fn generation<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<u64> {
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is a live client for the duration of the borrow; the metadata handle is a
    // copy owned by us, read once and destroyed once.
    let generation = unsafe {
        let cgmd = rd::rd_kafka_consumer_group_metadata(rk);
        if cgmd.is_null() {
            return None;
        }
        let g = rd::rd_kafka_consumer_group_metadata_generation_id(cgmd);
        rd::rd_kafka_consumer_group_metadata_destroy(cgmd);
        g
    };
    u64::try_from(generation).ok().filter(|g| *g > 0)
}

/// Whether a message carries a record (not an error, which is logged).
///
/// # Safety
/// `m` must point to a valid message not yet destroyed.
unsafe fn usable(m: *mut rd::rd_kafka_message_t, id: &PartitionId) -> bool {
    // SAFETY: the caller guarantees `m` is valid.
    let err = unsafe { (*m).err };
    if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return true;
    }
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF {
        tracing::warn!(partition = %id, error = ?err, "kafka: consumer error");
    }
    false
}

/// A record of one usable message whose key and payload were copied into `arena` at `*at`
/// (key first, then payload); advances `*at` past them.
///
/// # Safety
/// `m` must point to a valid message not yet destroyed.
unsafe fn to_record(
    m: *mut rd::rd_kafka_message_t,
    id: &PartitionId,
    arena: &Bytes,
    at: &mut usize,
) -> Option<Record> {
    // SAFETY: the caller guarantees `m` is valid.
    let msg = unsafe { &*m };
    let (key_len, len) = lens(msg);
    let key_at = *at;
    let payload_at = key_at + key_len;
    *at = payload_at + len;
    let key = (!msg.key.is_null()).then(|| arena.slice(key_at..payload_at));
    let payload = arena.slice(payload_at..*at);
    let mut headers = Headers::new();
    let mut hdrs: *mut rd::rd_kafka_headers_t = ptr::null_mut();
    // SAFETY: `hdrs` is only read when librdkafka reports headers; it belongs to the message.
    if unsafe { rd::rd_kafka_message_headers(m, &mut hdrs) }
        == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
    {
        let mut idx = 0;
        loop {
            let mut name: *const std::ffi::c_char = ptr::null();
            let mut value: *const c_void = ptr::null();
            let mut size = 0usize;
            // SAFETY: valid headers; out-pointers point to locals.
            let err =
                unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                break;
            }
            // SAFETY: header names are NUL-terminated; values are `size` bytes or null.
            let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
            let value = unsafe { bytes_of(value.cast_mut(), size) }.unwrap_or_default();
            headers.push(&name, Bytes::copy_from_slice(value));
            idx += 1;
        }
    }
    let mut ts_type = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
    // SAFETY: valid message; the out-pointer points to a local.
    let ts = unsafe { rd::rd_kafka_message_timestamp(m, &mut ts_type) };
    super::records::record(
        id,
        msg.offset,
        key,
        payload,
        headers,
        (ts >= 0).then_some(ts),
    )
}

/// The lengths of a message's key and payload, 0 for a null one.
fn lens(msg: &rd::rd_kafka_message_t) -> (usize, usize) {
    let len = |p: *mut c_void, n: usize| if p.is_null() { 0 } else { n };
    (len(msg.key, msg.key_len), len(msg.payload, msg.len))
}

/// # Safety
/// `p` must be null or point to `len` readable bytes that outlive the returned slice's use.
unsafe fn bytes_of<'a>(p: *mut c_void, len: usize) -> Option<&'a [u8]> {
    if p.is_null() {
        None
    } else {
        // SAFETY: guaranteed by the caller.
        Some(unsafe { std::slice::from_raw_parts(p as *const u8, len) })
    }
}

/// Commits `offsets` asynchronously with the result delivered to the consumer's own queue.
///
/// `rd_kafka_commit(.., async)` posts its result only to an `offset_commit_cb` set in the
/// configuration before the client is created, which rust-rdkafka never sets (it enables the
/// offset-commit *event* instead): its asynchronous commits are never answered. Handed the
/// consumer queue, `rd_kafka_commit_queue` answers with an `OFFSET_COMMIT` event there, which
/// the poll thread serves and rust-rdkafka turns into `ConsumerContext::commit_callback`.
pub(crate) fn commit_async<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    offsets: &rdkafka::TopicPartitionList,
) -> Result<(), rdkafka::error::KafkaError> {
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is a live client; the returned handle is ours and destroyed below.
    let queue = unsafe { rd::rd_kafka_queue_get_consumer(rk) };
    if queue.is_null() {
        // Not a group member (no `group.id`): fall back to the main queue.
        return consumer.commit(offsets, rdkafka::consumer::CommitMode::Async);
    }
    // SAFETY: valid client, list (copied by librdkafka) and queue; no callback, so the result
    // arrives as an event on `queue`, which the consumer's poll serves. The handle is only a
    // reference: destroying it leaves the queue itself alive.
    let err = unsafe {
        let err = rd::rd_kafka_commit_queue(rk, offsets.ptr(), queue, None, ptr::null_mut());
        rd::rd_kafka_queue_destroy(queue);
        err
    };
    if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(rdkafka::error::KafkaError::ConsumerCommit(err.into()))
    }
}
