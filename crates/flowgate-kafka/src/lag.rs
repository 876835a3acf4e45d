//! Lag of a Kafka partition: records between its high watermark and the next offset the
//! source hands to the runtime, sampled about once a second on the lag reader's thread
//! (`LagSample { unit: Records }`). The runtime adds what it received and has not committed,
//! so its lag is the committed view `kafka-consumer-groups --describe` shows.

use rdkafka::Offset;

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

#[cfg(test)]
mod tests {
    use rdkafka::Offset;

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
