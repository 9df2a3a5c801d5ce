//! What surrounds a handler call: its transaction opened through a database
//! outage, and its code guarded so that a panic is one message's permanent
//! failure rather than its worker's end.

use super::Inner;
use crate::handler::{Context, Failure, Handler, is_transient};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use sqlx::{AssertSqlSafe, Postgres, Transaction};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// How a handler transaction begins, in the same round trip as its
/// `BEGIN`: its statements may take no longer than `HANDLER_TIMEOUT` and
/// its lock waits no longer than that (a batch's: less), so the server
/// cancels a stuck statement itself, with an error classed transient.
/// Written once per worker.
pub(super) struct BeginStatements {
    /// A transaction of one message, or of a deadline scan.
    pub one: Arc<str>,
    /// A batch's, with the shorter lock wait of `batch::BATCH_LOCK_TIMEOUT`.
    pub batch: Arc<str>,
}

impl BeginStatements {
    pub fn new(handler_timeout: Duration, batch_lock_timeout: Duration) -> Self {
        let statement = |lock: Duration| -> Arc<str> {
            format!(
                "BEGIN; SET LOCAL statement_timeout = '{}ms'; SET LOCAL lock_timeout = '{}ms'",
                handler_timeout.as_millis(),
                lock.as_millis()
            )
            .into()
        };
        Self {
            one: statement(handler_timeout),
            batch: statement(batch_lock_timeout),
        }
    }
}

/// Opens the handler's transaction with `statement` (one of
/// [`BeginStatements`]), waiting out a database outage rather than spending
/// the message's attempts on it. Shutdown interrupts only the waits between
/// attempts, never an attempt: an attempt dropped after its `BEGIN` was
/// sent would return its connection to the pool inside a transaction. An
/// attempt is bounded by the pool's acquire timeout.
pub(super) async fn begin<H>(
    inner: &Inner<H>,
    token: &CancellationToken,
    statement: &Arc<str>,
) -> Option<Transaction<'static, Postgres>> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let attempt = inner
            .pool
            .begin_with(AssertSqlSafe(Arc::clone(statement)))
            .await;
        match attempt {
            Ok(tx) => return Some(tx),
            Err(e) if is_transient(&e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(worker = inner.spec.name, error = %e, retry_in = ?delay, "Database unavailable");
                tokio::select! {
                    () = token.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                error!(worker = inner.spec.name, error = %e, "Cannot open a database transaction");
                return None;
            }
        }
    }
}

/// Runs the handler's outside work, turning a panic into a permanent
/// failure and an overrun of `HANDLER_TIMEOUT` into a transient one.
pub(super) async fn run_prepare<H: Handler>(
    inner: &Inner<H>,
    message: H::Message,
) -> Result<H::Message, Failure> {
    let work = inner.handler.prepare(&inner.pool, message);
    guarded(inner, "handler panicked preparing", "preparing", work).await
}

/// Runs the handler, turning a panic into a permanent failure and an
/// overrun of `HANDLER_TIMEOUT` into a transient one.
pub(super) async fn run_handler<H: Handler>(
    inner: &Inner<H>,
    ctx: &mut Context,
    message: H::Message,
) -> Result<(), Failure> {
    let work = inner.handler.handle(ctx, message);
    guarded(inner, "handler panicked", "handling", work).await
}

/// Awaits handler code within `HANDLER_TIMEOUT`: a panic is a permanent
/// failure whose text starts with `panicked`, an overrun a transient one
/// naming what it was `doing`, so a handler that hangs on one message goes
/// through the retry tiers (and, hanging each time, to the dead queue as
/// `exhausted`) while its worker keeps consuming. Dropping the work rolls
/// back what it did in its transaction.
pub(super) async fn guarded<H, T>(
    inner: &Inner<H>,
    panicked: &str,
    doing: &str,
    work: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let limit = inner.settings.handler_timeout;
    match tokio::time::timeout(limit, unless_panicked(panicked, work)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(overran(doing, limit)),
    }
}

/// The failure of handler code that took longer than `limit`.
pub(super) fn overran(doing: &str, limit: Duration) -> Failure {
    Failure::Transient(format!(
        "handler gave no outcome {doing} within {limit:?} (HANDLER_TIMEOUT)"
    ))
}

/// Awaits handler code; a panic becomes a permanent failure whose text
/// starts with `what`, so one bad message cannot take its worker down.
pub(super) async fn unless_panicked<T>(
    what: &str,
    work: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            Err(Failure::Permanent(format!(
                "{what}: {}",
                panic_text(&panic)
            )))
        })
}

pub(super) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
