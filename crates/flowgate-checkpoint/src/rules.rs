//! The rules every store applies to checkpoint writes and lease changes, in one place.
//! (The PostgreSQL and Redis stores apply the same rules inside the server, in SQL and Lua.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowgate_core::{Checkpoint, Error, ErrorKind, Lease, PartitionId};

/// What to do with a checkpoint write given what is stored.
#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    /// Store it.
    Write,
    /// Same position and fence as stored: nothing to do.
    Unchanged,
}

/// Checks a checkpoint write against the stored one.
///
/// - A write whose fence is older than the stored fence is refused (`Fenced`): a zombie
///   worker whose generation or lease was superseded.
/// - A write that moves the position backwards is refused (`Fenced`): only an explicit reset
///   moves a checkpoint back.
/// - A missing fence counts as older than any fence.
pub fn check(stored: Option<&Checkpoint>, new: &Checkpoint) -> Result<Transition, Error> {
    let Some(old) = stored else {
        return Ok(Transition::Write);
    };
    if new.fence < old.fence {
        return Err(Error::new(
            ErrorKind::Fenced,
            "checkpoint write refused: a newer owner holds this partition",
        )
        .with_context("partition", &new.partition)
        .with_context("stored_fence", fmt_fence(old.fence))
        .with_context("write_fence", fmt_fence(new.fence)));
    }
    if new.position < old.position {
        return Err(Error::new(
            ErrorKind::Fenced,
            "checkpoint write refused: it would move the checkpoint backwards",
        )
        .with_context("partition", &new.partition)
        .with_context("stored", &old.position)
        .with_context("write", &new.position)
        .with_hint(
            "use a reset (`flowgate checkpoints reset`) to move a checkpoint back on purpose",
        ));
    }
    if new.position == old.position && new.fence == old.fence {
        return Ok(Transition::Unchanged);
    }
    Ok(Transition::Write)
}

/// Refuses a checkpoint whose fence is below the epoch of the partition's lease: the writer
/// lost the lease (or never held it).
pub fn check_lease_fence(lease_epoch: Option<u64>, new: &Checkpoint) -> Result<(), Error> {
    match lease_epoch {
        Some(epoch) if new.fence < Some(epoch) => Err(Error::new(
            ErrorKind::Fenced,
            "checkpoint write refused: the writer no longer holds this partition's lease",
        )
        .with_context("partition", &new.partition)
        .with_context("lease_epoch", epoch)
        .with_context("write_fence", fmt_fence(new.fence))),
        _ => Ok(()),
    }
}

/// A lease as a store keeps it; `expires_ms` is by the store's clock (ms since the epoch).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRecord {
    /// The holder, `None` once released or finished.
    pub owner: Option<String>,
    /// Raised by every take.
    pub epoch: u64,
    /// When it expires.
    pub expires_ms: u64,
    /// Processed to the end; never taken again.
    pub finished: bool,
}

/// Milliseconds since the Unix epoch by this machine's clock (the clock of the in-process
/// stores).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The lease after a successful take, or `None` if `owner` may not take it now.
pub fn acquire(
    stored: Option<&LeaseRecord>,
    owner: &str,
    now_ms: u64,
    ttl: Duration,
    steal: Option<u64>,
) -> Option<LeaseRecord> {
    let epoch = match stored {
        None => 0,
        Some(l) if l.finished => return None,
        Some(l) if l.owner.is_none() || l.expires_ms <= now_ms || steal == Some(l.epoch) => l.epoch,
        Some(_) => return None,
    };
    Some(LeaseRecord {
        owner: Some(owner.to_string()),
        epoch: epoch + 1,
        expires_ms: now_ms.saturating_add(ms(ttl)),
        finished: false,
    })
}

/// Checks that the caller still holds `lease` (same owner and epoch, not finished), and
/// returns the stored lease.
pub fn check_holder<'a>(
    stored: Option<&'a LeaseRecord>,
    lease: &Lease,
) -> Result<&'a LeaseRecord, Error> {
    match stored {
        Some(l) if !l.finished && l.epoch == lease.epoch && l.owner == lease.owner => Ok(l),
        _ => Err(lease.lost()),
    }
}

/// The lease after a renewal by its holder.
pub fn renewed(stored: &LeaseRecord, now_ms: u64, ttl: Duration) -> LeaseRecord {
    LeaseRecord {
        expires_ms: now_ms.saturating_add(ms(ttl)),
        ..stored.clone()
    }
}

/// The lease after its holder released it (`finished`: processed to the end).
pub fn given_up(stored: &LeaseRecord, finished: bool) -> LeaseRecord {
    LeaseRecord {
        owner: None,
        expires_ms: 0,
        finished,
        ..stored.clone()
    }
}

/// The public view of a stored lease at `now_ms`.
pub fn view(partition: PartitionId, l: &LeaseRecord, now_ms: u64) -> Lease {
    Lease {
        partition,
        owner: l.owner.clone(),
        epoch: l.epoch,
        remaining: if l.owner.is_some() {
            Duration::from_millis(l.expires_ms.saturating_sub(now_ms))
        } else {
            Duration::ZERO
        },
        finished: l.finished,
    }
}

fn fmt_fence(f: Option<u64>) -> String {
    f.map_or_else(|| "none".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_core::{PartitionId, Position};

    fn cp(pos: u64, fence: Option<u64>) -> Checkpoint {
        Checkpoint::new(PartitionId::new("p"), Position::from(pos)).with_fence(fence)
    }

    #[test]
    fn fences_and_positions() {
        assert_eq!(check(None, &cp(1, None)).unwrap(), Transition::Write);
        assert_eq!(
            check(Some(&cp(5, Some(2))), &cp(6, Some(2))).unwrap(),
            Transition::Write
        );
        assert_eq!(
            check(Some(&cp(5, Some(2))), &cp(5, Some(2))).unwrap(),
            Transition::Unchanged
        );
        assert_eq!(
            check(Some(&cp(5, Some(2))), &cp(9, Some(1)))
                .unwrap_err()
                .kind(),
            ErrorKind::Fenced
        );
        assert_eq!(
            check(Some(&cp(5, Some(2))), &cp(9, None))
                .unwrap_err()
                .kind(),
            ErrorKind::Fenced
        );
        assert_eq!(
            check(Some(&cp(5, None)), &cp(4, None)).unwrap_err().kind(),
            ErrorKind::Fenced
        );
        assert_eq!(
            check(Some(&cp(5, Some(1))), &cp(5, Some(3))).unwrap(),
            Transition::Write
        );
    }
}
