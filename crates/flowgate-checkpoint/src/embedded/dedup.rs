//! Dedup marks and positional ranges, swept as new ones are written.

use super::*;

impl EmbeddedStore {
    pub(super) fn mark_in(
        &self,
        txn: &WriteTransaction,
        pipeline: &str,
        keys: &[IdempotencyKey],
        ttl: Duration,
    ) -> Result<(), Error> {
        let now = now_ms();
        let expires = now.saturating_add(ttl.as_millis() as u64).to_be_bytes();
        let mut marks = txn
            .open_table(MARKS)
            .map_err(|e| storage(&self.path, "open dedup", e))?;
        let mut key = Vec::with_capacity(64);
        for k in keys {
            key.clear();
            key.extend_from_slice(pipeline.as_bytes());
            key.push(0);
            key.extend_from_slice(k.as_bytes());
            marks
                .insert(key.as_slice(), expires.as_slice())
                .map_err(|e| storage(&self.path, "write mark", e))?;
        }
        self.sweep(
            txn,
            &mut marks,
            SWEEP_CURSOR,
            keys.len() * SWEEP_FACTOR,
            now,
        )
    }

    pub(super) fn mark_ranges_in(
        &self,
        txn: &WriteTransaction,
        pipeline: &str,
        ranges: &[PositionRange],
        ttl: Duration,
    ) -> Result<(), Error> {
        let now = now_ms();
        let expires = now.saturating_add(ttl.as_millis() as u64);
        let mut table = txn
            .open_table(RANGES)
            .map_err(|e| storage(&self.path, "open dedup ranges", e))?;
        for r in ranges {
            // Ranges of a partition never overlap: a new range is merged with the one it
            // overlaps (and swallows the ones it covers), so a lookup only ever needs the
            // last range starting at or before a position.
            let prefix = range_prefix(pipeline, &r.partition);
            let key_of = |p: &Position| {
                let mut k = prefix.clone();
                k.extend_from_slice(&p.to_ordered_bytes());
                k
            };
            let (mut first, mut last, mut exp) = (r.first.clone(), r.last.clone(), expires);
            let mut remove: Vec<Vec<u8>> = Vec::new();
            let start = key_of(&first);
            let pred: Option<(Vec<u8>, Vec<u8>)> = match table
                .range::<&[u8]>(prefix.as_slice()..=start.as_slice())
                .map_err(|e| storage(&self.path, "scan dedup ranges", e))?
                .next_back()
            {
                Some(item) => {
                    let (k, v) = item.map_err(|e| storage(&self.path, "scan dedup ranges", e))?;
                    Some((k.value().to_vec(), v.value().to_vec()))
                }
                None => None,
            };
            if let Some((pk, pv)) = pred {
                let (pexp, plast) = self.decode_range_value(&pv)?;
                if plast >= first {
                    first = Position::from_ordered_bytes(&pk[prefix.len()..]).ok_or_else(|| {
                        corrupt(&self.path, "holds an unreadable dedup range", "bad key")
                    })?;
                    if plast > last {
                        last = plast;
                    }
                    exp = exp.max(pexp);
                    remove.push(pk);
                }
            }
            let end = key_of(&last);
            let mut swallowed: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            for item in table
                .range::<&[u8]>(start.as_slice()..=end.as_slice())
                .map_err(|e| storage(&self.path, "scan dedup ranges", e))?
            {
                let (k, v) = item.map_err(|e| storage(&self.path, "scan dedup ranges", e))?;
                swallowed.push((k.value().to_vec(), v.value().to_vec()));
            }
            for (k, v) in swallowed {
                let (sexp, slast) = self.decode_range_value(&v)?;
                if slast > last {
                    last = slast;
                }
                exp = exp.max(sexp);
                remove.push(k);
            }
            for k in remove {
                table
                    .remove(k.as_slice())
                    .map_err(|e| storage(&self.path, "merge dedup ranges", e))?;
            }
            let mut value = exp.to_be_bytes().to_vec();
            value.extend_from_slice(&last.to_ordered_bytes());
            table
                .insert(key_of(&first).as_slice(), value.as_slice())
                .map_err(|e| storage(&self.path, "write dedup range", e))?;
        }
        self.sweep(
            txn,
            &mut table,
            RANGE_SWEEP_CURSOR,
            ranges.len() * SWEEP_FACTOR,
            now,
        )
    }

    pub(super) fn decode_range_value(&self, v: &[u8]) -> Result<(u64, Position), Error> {
        let bad = || {
            corrupt(
                &self.path,
                "holds an unreadable dedup range",
                "bad encoding",
            )
        };
        let (exp, last) = v.split_at_checked(8).ok_or_else(bad)?;
        let exp = u64::from_be_bytes(exp.try_into().map_err(|_| bad())?);
        Ok((exp, Position::from_ordered_bytes(last).ok_or_else(bad)?))
    }

    /// Incremental sweep: walks `budget` entries from where the last sweep stopped and removes
    /// the expired ones (values start with their 8-byte expiry). Cleanup is amortised over the
    /// writes and needs no expiry index.
    pub(super) fn sweep(
        &self,
        txn: &WriteTransaction,
        table: &mut redb::Table<'_, &[u8], &[u8]>,
        cursor_key: &str,
        budget: usize,
        now: u64,
    ) -> Result<(), Error> {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| storage(&self.path, "open meta", e))?;
        let cursor: Vec<u8> = meta
            .get(cursor_key)
            .map_err(|e| storage(&self.path, "read sweep cursor", e))?
            .and_then(|v| hex_decode(v.value()))
            .unwrap_or_default();
        let mut expired: Vec<Vec<u8>> = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        let mut walked = 0;
        for item in table
            .range::<&[u8]>(cursor.as_slice()..)
            .map_err(|e| storage(&self.path, "sweep", e))?
            .take(budget)
        {
            let (k, v) = item.map_err(|e| storage(&self.path, "sweep", e))?;
            if expiry_of(v.value()) <= now {
                expired.push(k.value().to_vec());
            }
            last = Some(k.value().to_vec());
            walked += 1;
        }
        for k in &expired {
            table
                .remove(k.as_slice())
                .map_err(|e| storage(&self.path, "sweep", e))?;
        }
        // Past the end: start over from the beginning next time.
        let next = match last {
            Some(mut l) if walked == budget => {
                l.push(0);
                hex_encode(&l)
            }
            _ => String::new(),
        };
        meta.insert(cursor_key, next.as_str())
            .map_err(|e| storage(&self.path, "write sweep cursor", e))?;
        Ok(())
    }
}

#[async_trait]
impl DedupStore for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded store {}", self.path.display())
    }

    async fn seen(&self, pipeline: &str, keys: &[IdempotencyKey]) -> Result<Vec<bool>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = pipeline.to_string();
        let keys = keys.to_vec();
        self.blocking(move |s| {
            let now = now_ms();
            let marks = s.read_table(MARKS, "open dedup")?;
            keys.iter()
                .map(|k| {
                    let mk = mark_key(&pipeline, k);
                    Ok(marks
                        .get(mk.as_slice())
                        .map_err(|e| storage(&s.path, "read mark", e))?
                        .is_some_and(|v| expiry_of(v.value()) > now))
                })
                .collect()
        })
        .await
    }

    async fn mark(
        &self,
        pipeline: &str,
        keys: &[IdempotencyKey],
        ttl: Duration,
    ) -> Result<(), Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let pipeline = pipeline.to_string();
        let keys = keys.to_vec();
        self.blocking(move |s| {
            let txn = s.begin_write()?;
            s.mark_in(&txn, &pipeline, &keys, ttl)?;
            txn.commit().map_err(|e| storage(&s.path, "commit", e))
        })
        .await
    }

    fn supports_position_ranges(&self) -> bool {
        true
    }

    async fn seen_positions(
        &self,
        pipeline: &str,
        partition: &PartitionId,
        positions: &[Position],
    ) -> Result<Vec<bool>, Error> {
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = range_prefix(pipeline, partition);
        let positions = positions.to_vec();
        self.blocking(move |s| {
            let now = now_ms();
            let table = s.read_table(RANGES, "open dedup ranges")?;
            // One scan per call, not one search per position: visit positions in order and
            // the ranges starting at or before each, keeping the furthest live `last`.
            let mut order: Vec<usize> = (0..positions.len()).collect();
            if !positions.windows(2).all(|w| w[0] <= w[1]) {
                order.sort_by(|a, b| positions[*a].cmp(&positions[*b]));
            }
            let key_of = |p: &Position| {
                let mut k = prefix.clone();
                k.extend_from_slice(&p.to_ordered_bytes());
                k
            };
            let lo = key_of(&positions[order[0]]);
            let hi = key_of(&positions[order[order.len() - 1]]);
            let mut ranges: Vec<(Position, Position)> = Vec::new();
            // Ranges never overlap (see `mark_ranges_in`): the last one starting before the
            // first probe, then those starting among the probes.
            let before = table
                .range::<&[u8]>(prefix.as_slice()..lo.as_slice())
                .map_err(|e| storage(&s.path, "scan dedup ranges", e))?
                .next_back();
            let inside = table
                .range::<&[u8]>(lo.as_slice()..=hi.as_slice())
                .map_err(|e| storage(&s.path, "scan dedup ranges", e))?;
            for item in before.into_iter().chain(inside) {
                let (k, v) = item.map_err(|e| storage(&s.path, "scan dedup ranges", e))?;
                let (exp, last) = s.decode_range_value(v.value())?;
                if exp <= now {
                    continue;
                }
                let first =
                    Position::from_ordered_bytes(&k.value()[prefix.len()..]).ok_or_else(|| {
                        corrupt(&s.path, "holds an unreadable dedup range", "bad key")
                    })?;
                ranges.push((first, last));
            }
            ranges.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = vec![false; positions.len()];
            let mut furthest: Option<&Position> = None;
            let mut next = 0;
            for ix in order {
                let p = &positions[ix];
                while next < ranges.len() && ranges[next].0 <= *p {
                    if furthest.is_none_or(|f| ranges[next].1 > *f) {
                        furthest = Some(&ranges[next].1);
                    }
                    next += 1;
                }
                out[ix] = furthest.is_some_and(|f| f >= p);
            }
            Ok(out)
        })
        .await
    }

    async fn last_marked_position(
        &self,
        pipeline: &str,
        partition: &PartitionId,
    ) -> Result<Option<Position>, Error> {
        let prefix = range_prefix(pipeline, partition);
        self.blocking(move |s| {
            let now = now_ms();
            let table = s.read_table(RANGES, "open dedup ranges")?;
            // The prefix ends in a 0 byte: the same prefix ending in 1 bounds its keys.
            let mut end = prefix.clone();
            if let Some(b) = end.last_mut() {
                *b = 1;
            }
            // Ranges never overlap (see `mark_ranges_in`): walking back from the last one
            // started, the first live range holds the highest live position.
            let scan = table
                .range::<&[u8]>(prefix.as_slice()..end.as_slice())
                .map_err(|e| storage(&s.path, "scan dedup ranges", e))?;
            for item in scan.rev() {
                let (_, v) = item.map_err(|e| storage(&s.path, "scan dedup ranges", e))?;
                let (exp, last) = s.decode_range_value(v.value())?;
                if exp > now {
                    return Ok(Some(last));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn mark_ranges(
        &self,
        pipeline: &str,
        ranges: &[PositionRange],
        ttl: Duration,
    ) -> Result<(), Error> {
        if ranges.is_empty() {
            return Ok(());
        }
        let pipeline = pipeline.to_string();
        let ranges = ranges.to_vec();
        self.blocking(move |s| {
            let txn = s.begin_write()?;
            s.mark_ranges_in(&txn, &pipeline, &ranges, ttl)?;
            txn.commit().map_err(|e| storage(&s.path, "commit", e))
        })
        .await
    }
}
