//! The coordinator's run: open the source, the loop, then shut down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_core::{Checkpoint, Credits, Error, Sink, Source, SourceContext};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::shutdown::Shutdown;
use crate::stats::{Health, RunSummary};
use crate::worker::Completion;

use super::{CommitOutput, State};

/// What the coordinator works with besides its state.
pub(super) struct Running {
    pub(super) source: Box<dyn Source>,
    pub(super) events: mpsc::UnboundedReceiver<Completion>,
    pub(super) sink: Arc<dyn Sink>,
    pub(super) dead_letter: Option<Arc<dyn Sink>>,
    pub(super) credits: Credits,
    /// The dedup marker task, awaited after the state is gone.
    pub(super) marker: Option<JoinHandle<()>>,
}

impl State {
    /// Opens the source, retrying temporary failures within the retry budget.
    pub(super) async fn open(
        &mut self,
        source: &mut Box<dyn Source>,
        credits: Credits,
    ) -> Result<(), Error> {
        let name = self.name.clone();
        let stats = self.stats.clone();
        let retry = self.settings.retry.clone();
        let ctx = SourceContext::new(name.clone(), credits)
            .with_max_in_flight_per_partition(self.settings.max_in_flight_per_partition);
        let mut backoff = retry.policy().start();
        loop {
            match source.open(ctx.clone()).await {
                Ok(()) => break,
                Err(e) if e.is_temporary() => match backoff.next_delay() {
                    Some(delay) => {
                        tracing::warn!(pipeline = %name, error = %e, ?delay, attempt = backoff.attempts(), "cannot open the source, retrying");
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(e.with_context("while", "opening the source")),
                },
                Err(e) => return Err(e.with_context("while", "opening the source")),
            }
        }
        stats.set_health(Health::Healthy);
        // Connected until a source or store answer says otherwise.
        self.metrics.source_connected.set(1.0);
        self.metrics.store_connected.set(1.0);
        tracing::info!(pipeline = %name, store = self.store.as_ref().map(|s| s.describe()), "pipeline started");

        Ok(())
    }

    /// The loop: worker completions first, then commits, shutdown, the source, timers; until
    /// drained. Returns the checkpoint write still running, if any.
    pub(super) async fn turn(
        &mut self,
        run: &mut Running,
        shutdown: Shutdown,
    ) -> Option<JoinHandle<CommitOutput>> {
        let source = &mut run.source;
        let events_rx = &mut run.events;
        let mut shutdown = shutdown;
        let mut shutdown_fired = false;
        let mut commit_task: Option<JoinHandle<CommitOutput>> = None;
        let tick = Duration::from_millis(250);
        let mut next_tick = Instant::now() + tick;

        loop {
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + tick;
                self.on_tick(now);
            }
            self.dispatch(now);
            if commit_task.is_none() {
                commit_task = self.maybe_start_commit(now, source).await;
            }
            if self.finish_revokes(now, &mut commit_task, source).await {
                continue;
            }
            if self.drain_complete(now) {
                break;
            }
            let want_source = !self.source_done && self.drain_deadline.is_none();
            let deadline = self
                .next_deadline(now, commit_task.is_none())
                .min(next_tick);
            tokio::select! {
                biased;
                Some(done) = events_rx.recv() => {
                    self.on_completion(done, source).await;
                    // Amortise: take whatever else is ready.
                    while let Ok(done) = events_rx.try_recv() {
                        self.on_completion(done, source).await;
                    }
                }
                Some(settled) = self.settling.next(), if !self.settling.is_empty() => {
                    self.settle(settled, source).await;
                }
                res = async { commit_task.as_mut().expect("guarded").await }, if commit_task.is_some() => {
                    commit_task = None;
                    self.on_commit_done(res, source).await;
                }
                _ = &mut shutdown, if !shutdown_fired => {
                    shutdown_fired = true;
                    tracing::info!(pipeline = %self.name, "shutdown requested: draining");
                    self.begin_drain(Instant::now());
                }
                ev = source.next(), if want_source => {
                    match ev {
                        Ok(ev) => self.on_source_event(ev, source).await,
                        Err(e) if e.is_temporary() => {
                            tracing::warn!(pipeline = %self.name, error = %e, "source error, retrying");
                            tokio::time::sleep(self.settings.retry.initial_backoff).await;
                        }
                        Err(e) => self.fail(e),
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }

        commit_task
    }

    /// The final checkpoint, then closing the source and the sinks; the run's summary.
    pub(super) async fn shut_down(
        &mut self,
        run: Running,
        mut commit_task: Option<JoinHandle<CommitOutput>>,
        started: Instant,
    ) -> Result<RunSummary, Error> {
        let Running {
            mut source,
            sink,
            dead_letter,
            ..
        } = run;
        let stats = self.stats.clone();
        if let Some(task) = commit_task.take() {
            let res = task.await;
            self.on_commit_done(res, &mut source).await;
        }
        let flush = sink.flush().await;
        if let Err(e) = flush {
            self.fail(e);
        }
        if let Err(e) = self
            .commit_now(&mut source, self.partitions.keys().cloned().collect())
            .await
        {
            self.fail(e);
        }
        let close_timeout = Duration::from_secs(30);
        match tokio::time::timeout(close_timeout, source.close()).await {
            Ok(Err(e)) => {
                tracing::warn!(pipeline = %self.name, error = %e, "closing the source failed")
            }
            Err(_) => {
                tracing::warn!(pipeline = %self.name, "closing the source took longer than {close_timeout:?}; abandoned")
            }
            Ok(Ok(())) => {}
        }
        for s in std::iter::once(&sink).chain(dead_letter.as_ref()) {
            if let Ok(Err(e)) = tokio::time::timeout(close_timeout, s.close()).await {
                tracing::warn!(pipeline = %self.name, error = %e, "closing a sink failed");
            }
        }
        stats.set_health(Health::Stopped);
        let drained = self.partitions.values().all(|p| p.tracker.pending() == 0);
        // A source that cannot start from a position (a RabbitMQ queue) keeps its progress in
        // its broker (acks): its positions (delivery tags) are not checkpoints.
        let mut checkpoints: Vec<Checkpoint> = if self.caps.replayable {
            self.committed.values().cloned().collect()
        } else {
            Vec::new()
        };
        checkpoints.sort_by(|a, b| a.partition.cmp(&b.partition));
        let summary = RunSummary {
            pipeline: self.name.clone(),
            elapsed: started.elapsed(),
            stats: stats.snapshot(),
            checkpoints,
            drained,
        };
        tracing::info!(pipeline = %self.name, "{summary}");
        match self.fatal.take() {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}
