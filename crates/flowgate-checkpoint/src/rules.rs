//! The rules every store applies to checkpoint writes, in one place.

use flowgate_core::{Checkpoint, Error, ErrorKind};

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
