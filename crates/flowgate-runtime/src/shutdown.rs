//! Shutdown signals.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;

/// When a pipeline should stop fetching, drain and write its final checkpoint.
pub struct Shutdown {
    fut: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// Triggers a [`Shutdown`] made by [`Shutdown::manual`]. Dropping it does not trigger.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl ShutdownTrigger {
    /// Starts the shutdown.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    /// Stops on SIGINT or SIGTERM (Ctrl-C on other platforms).
    pub fn on_signals() -> Self {
        Shutdown::from_future(async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{SignalKind, signal};
                match (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) {
                    (Ok(mut int), Ok(mut term)) => {
                        tokio::select! {
                            _ = int.recv() => tracing::info!("SIGINT received: draining"),
                            _ = term.recv() => tracing::info!("SIGTERM received: draining"),
                        }
                    }
                    _ => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            }
            #[cfg(not(unix))]
            {
                let _ = tokio::signal::ctrl_c().await;
            }
        })
    }

    /// Never stops on its own (finite sources end by themselves).
    pub fn never() -> Self {
        Shutdown::from_future(std::future::pending())
    }

    /// Stops after a duration.
    pub fn after(d: Duration) -> Self {
        Shutdown::from_future(tokio::time::sleep(d))
    }

    /// Stops when the future completes.
    pub fn from_future(fut: impl Future<Output = ()> + Send + 'static) -> Self {
        Shutdown { fut: Box::pin(fut) }
    }

    /// A shutdown triggered by hand.
    pub fn manual() -> (ShutdownTrigger, Shutdown) {
        let (tx, mut rx) = watch::channel(false);
        let fut = async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        (ShutdownTrigger { tx }, Shutdown::from_future(fut))
    }

    /// Stops at whichever of the two comes first.
    pub fn or(self, other: Shutdown) -> Shutdown {
        Shutdown::from_future(async move {
            tokio::select! {
                _ = self.fut => {},
                _ = other.fut => {},
            }
        })
    }
}

impl Future for Shutdown {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.fut.as_mut().poll(cx)
    }
}
