use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A record's place in its partition, totally ordered.
///
/// One type fits every broker:
/// - Kafka offsets (`0..=i64::MAX`) and RabbitMQ stream offsets / delivery tags (`u64`);
/// - Kinesis positions: a sequence number (a decimal string of up to 129 digits; real ones
///   have ~56, more than `u128` holds) times 2^20 plus a KPL sub-sequence number, so up to
///   136 digits. Positions may have up to [`MAX_DIGITS`].
///
/// Values that fit in a `u128` are stored inline; larger ones are kept as their canonical
/// decimal text (no leading zeros), which orders correctly by (length, text). Cloning is
/// cheap in both cases.
///
/// A checkpoint stores the position of the **last processed** record (inclusive); each adapter
/// turns it into its broker's resume point (Kafka: offset + 1; Kinesis:
/// `AT_SEQUENCE_NUMBER`, dropping what was already read; RabbitMQ streams: offset + 1).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Position(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    Small(u128),
    Big(Arc<str>),
}

/// The most decimal digits a position may have.
pub const MAX_DIGITS: usize = 160;

/// The text given to [`Position::parse_decimal`] is not a canonical non-negative decimal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid position {input:?}: expected a non-negative decimal number of at most 160 digits")]
pub struct ParsePositionError {
    input: String,
}

impl Position {
    /// The first position of a partition.
    pub const ZERO: Position = Position(Repr::Small(0));

    /// A position from an unsigned integer (offset, delivery tag, generator sequence).
    pub const fn new(value: u128) -> Self {
        Position(Repr::Small(value))
    }

    /// A position from a Kafka offset; `None` for negative (logical) offsets.
    pub fn from_offset(offset: i64) -> Option<Self> {
        u128::try_from(offset).ok().map(Position::new)
    }

    /// Parses a decimal string such as a Kinesis sequence number.
    ///
    /// Leading zeros are accepted and removed, so equal numbers compare equal.
    pub fn parse_decimal(text: &str) -> Result<Self, ParsePositionError> {
        let err = || ParsePositionError {
            input: text.chars().take(160).collect(),
        };
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let trimmed = text.trim_start_matches('0');
        if trimmed.len() > MAX_DIGITS {
            return Err(err());
        }
        if trimmed.is_empty() {
            return Ok(Position::ZERO);
        }
        match trimmed.parse::<u128>() {
            Ok(v) => Ok(Position::new(v)),
            Err(_) => Ok(Position(Repr::Big(Arc::from(trimmed)))),
        }
    }

    /// The value as `u64`, if it fits.
    pub fn as_u64(&self) -> Option<u64> {
        match &self.0 {
            Repr::Small(v) => u64::try_from(*v).ok(),
            Repr::Big(_) => None,
        }
    }

    /// The value as `u128`, if it fits.
    pub fn as_u128(&self) -> Option<u128> {
        match &self.0 {
            Repr::Small(v) => Some(*v),
            Repr::Big(_) => None,
        }
    }

    /// The value as a Kafka offset (`i64`), if it fits.
    pub fn as_offset(&self) -> Option<i64> {
        self.as_u128().and_then(|v| i64::try_from(v).ok())
    }

    /// A byte encoding whose lexicographic order is the numeric order, for stores that keep
    /// positions in ordered keys (B-trees, `bytea`, sorted sets): `0x00` + 16 big-endian
    /// bytes when the value fits a `u128`, else `0x01`, the digit count, the digits.
    pub fn to_ordered_bytes(&self) -> Vec<u8> {
        match &self.0 {
            Repr::Small(v) => {
                let mut b = Vec::with_capacity(17);
                b.push(0);
                b.extend_from_slice(&v.to_be_bytes());
                b
            }
            Repr::Big(s) => {
                let mut b = Vec::with_capacity(2 + s.len());
                b.push(1);
                b.push(s.len() as u8);
                b.extend_from_slice(s.as_bytes());
                b
            }
        }
    }

    /// Decodes [`to_ordered_bytes`](Self::to_ordered_bytes); `None` if the bytes are not such
    /// an encoding.
    pub fn from_ordered_bytes(b: &[u8]) -> Option<Position> {
        match b.split_first()? {
            (0, rest) => Some(Position::new(u128::from_be_bytes(rest.try_into().ok()?))),
            (1, rest) => {
                let (len, digits) = rest.split_first()?;
                if digits.len() != usize::from(*len) {
                    return None;
                }
                Position::parse_decimal(std::str::from_utf8(digits).ok()?).ok()
            }
            _ => None,
        }
    }

    /// The next position (`self + 1`), for brokers whose resume point is "after".
    pub fn successor(&self) -> Position {
        match &self.0 {
            Repr::Small(v) => match v.checked_add(1) {
                Some(n) => Position::new(n),
                None => Position(Repr::Big(Arc::from(decimal_increment(&v.to_string())))),
            },
            Repr::Big(s) => Position(Repr::Big(Arc::from(decimal_increment(s)))),
        }
    }
}

fn decimal_increment(digits: &str) -> String {
    let mut bytes = digits.as_bytes().to_vec();
    let mut i = bytes.len();
    loop {
        if i == 0 {
            bytes.insert(0, b'1');
            break;
        }
        i -= 1;
        if bytes[i] == b'9' {
            bytes[i] = b'0';
        } else {
            bytes[i] += 1;
            break;
        }
    }
    String::from_utf8(bytes).unwrap_or_default()
}

impl Ord for Position {
    fn cmp(&self, other: &Self) -> Ordering {
        match (&self.0, &other.0) {
            (Repr::Small(a), Repr::Small(b)) => a.cmp(b),
            (Repr::Small(_), Repr::Big(_)) => Ordering::Less,
            (Repr::Big(_), Repr::Small(_)) => Ordering::Greater,
            (Repr::Big(a), Repr::Big(b)) => a.len().cmp(&b.len()).then_with(|| a.cmp(b)),
        }
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Small(v) => write!(f, "{v}"),
            Repr::Big(s) => f.write_str(s),
        }
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Position({self})")
    }
}

impl FromStr for Position {
    type Err = ParsePositionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Position::parse_decimal(s)
    }
}

impl From<u64> for Position {
    fn from(v: u64) -> Self {
        Position::new(u128::from(v))
    }
}

impl serde::Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Position {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Position::parse_decimal(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kinesis_sequence_numbers_order_numerically() {
        let a = Position::parse_decimal("49590338271490256608559692538361571095921575989136588898")
            .unwrap();
        let b = Position::parse_decimal("49590338271490256608559692538361571095921575989136588899")
            .unwrap();
        let small = Position::new(u128::MAX);
        assert!(a < b);
        assert!(small < a);
        assert_eq!(
            b.to_string(),
            "49590338271490256608559692538361571095921575989136588899"
        );
        assert_eq!(a.successor(), b);
    }

    #[test]
    fn rejects_garbage_and_accepts_leading_zeros() {
        assert!(Position::parse_decimal("").is_err());
        assert!(Position::parse_decimal("-1").is_err());
        assert!(Position::parse_decimal("12a").is_err());
        assert!(Position::parse_decimal(&"9".repeat(MAX_DIGITS)).is_ok());
        assert!(Position::parse_decimal(&"9".repeat(MAX_DIGITS + 1)).is_err());
        assert_eq!(Position::parse_decimal("007").unwrap(), Position::new(7));
        assert_eq!(Position::parse_decimal("000").unwrap(), Position::ZERO);
    }

    #[test]
    fn successor_crosses_u128() {
        let max = Position::new(u128::MAX);
        let next = max.successor();
        assert!(next > max);
        assert_eq!(next.to_string(), "340282366920938463463374607431768211456");
        assert_eq!(
            Position::parse_decimal("999").unwrap().successor(),
            Position::new(1000)
        );
    }

    fn decimal() -> impl Strategy<Value = String> {
        prop_oneof![any::<u64>().prop_map(|v| v.to_string()), "[1-9][0-9]{0,60}",]
    }

    proptest! {
        #[test]
        fn order_matches_numeric_order(a in decimal(), b in decimal()) {
            let pa = Position::parse_decimal(&a).unwrap();
            let pb = Position::parse_decimal(&b).unwrap();
            let numeric = a.len().cmp(&b.len()).then_with(|| a.cmp(&b));
            prop_assert_eq!(pa.cmp(&pb), numeric);
            prop_assert_eq!(pa.to_string(), a);
        }

        #[test]
        fn ordered_bytes_keep_order_and_round_trip(a in decimal(), b in decimal()) {
            let pa = Position::parse_decimal(&a).unwrap();
            let pb = Position::parse_decimal(&b).unwrap();
            prop_assert_eq!(pa.to_ordered_bytes().cmp(&pb.to_ordered_bytes()), pa.cmp(&pb));
            prop_assert_eq!(Position::from_ordered_bytes(&pa.to_ordered_bytes()), Some(pa));
        }

        #[test]
        fn display_round_trip(a in decimal()) {
            let p = Position::parse_decimal(&a).unwrap();
            prop_assert_eq!(Position::parse_decimal(&p.to_string()).unwrap(), p);
        }
    }
}
