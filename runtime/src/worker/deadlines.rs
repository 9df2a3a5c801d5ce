//! The handler's deadline scans (`Handler::expire_deadlines`), each in its
//! own transaction, committed and relayed like a handler's messages.

use super::{Inner, guard, outbox};
use crate::envelope::Envelope;
use crate::handler::{Context, Failure, Handler};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Scans the handler's deadlines every `every` until shutdown. A scan that
/// acted on some runs again at once; one that failed is rolled back,
/// logged, and run again at the next tick.
pub(super) async fn deadline_loop<H: Handler>(
    inner: Arc<Inner<H>>,
    token: CancellationToken,
    every: Duration,
) {
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        loop {
            match expire_deadlines(&inner, &token).await {
                Ok(0) => break,
                Ok(n) => debug!(worker = inner.spec.name, deadlines = n, "Deadlines expired"),
                Err(e) => {
                    warn!(worker = inner.spec.name, error = %e, "Deadline scan failed; trying again at the next tick");
                    break;
                }
            }
            if token.is_cancelled() {
                return;
            }
        }
    }
}

/// One deadline scan in its own transaction, committed with what it emitted
/// and relayed like a handler's messages.
async fn expire_deadlines<H: Handler>(
    inner: &Inner<H>,
    token: &CancellationToken,
) -> Result<usize, Failure> {
    let Some(tx) = guard::begin(inner, token, &inner.begin.one).await else {
        return Ok(0);
    };
    let mut ctx = Context::new(Envelope::started_here("deadlines"), tx);
    let expired = guard::guarded(
        inner,
        "deadline scan panicked",
        "scanning deadlines",
        inner.handler.expire_deadlines(&mut ctx),
    )
    .await?;
    let (tx, emitted) = ctx.into_parts();
    if expired == 0 && emitted.is_empty() {
        // Nothing was due: nothing to commit (dropping rolls back).
        return Ok(0);
    }
    let ids = outbox::commit_with_outbox(inner, tx, &emitted).await?;
    outbox::relay(inner, (ids, emitted)).await;
    Ok(expired)
}
