//! Lag of a Kafka partition: records between its high watermark and the next offset the
//! source hands to the runtime, sampled about once a second on the poll thread
//! (`LagSample { unit: Records }`). Kafka's own `kafka-consumer-groups --describe` shows the
//! committed view of the same lag, because offsets are committed only after the checkpoint
//! store has them.

/// Records behind the high watermark.
pub(crate) fn records_behind(high_watermark: i64, next_offset: i64) -> u64 {
    (high_watermark - next_offset).max(0) as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn never_negative() {
        assert_eq!(super::records_behind(10, 4), 6);
        assert_eq!(super::records_behind(3, 7), 0);
    }
}
