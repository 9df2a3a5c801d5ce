//! How deliveries are gathered into chunks, each handled in one transaction.
//!
//! A chunk takes every delivery already waiting, up to `BATCH_SIZE`. It
//! waits `BATCH_LINGER_MS` for more only when company is likely and the
//! wait costs little (decision 0012):
//! - while another chunk of the same consumer is being handled: the worker
//!   is busy anyway, and a few milliseconds of gathering save a transaction,
//!   a relay and a wake-up per message;
//! - when the chunk's first delivery came less than the linger after the
//!   one before it: at that rate, more are on their way;
//! - for the first chunk of a consuming session: a queue with a backlog
//!   pours it in over a few milliseconds after the subscription.
//!
//! An idle worker on a quiet queue hands a delivery on at once, so a quiet
//! system pays no linger on any of an order's hops.

use futures::{FutureExt, Stream, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How many chunks of one consumer are being handled right now.
#[derive(Clone, Default)]
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts a chunk as in flight until the returned guard is dropped
    /// (also when its handling panics).
    pub(crate) fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.0.clone())
    }

    fn any(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }
}

pub(crate) struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Chunks of at most `size` items of `items`, gathered as the module
/// describes. A chunk the stream's end cut short is still handed on.
pub(crate) fn chunks<S>(
    items: S,
    size: usize,
    linger: Duration,
    in_flight: InFlight,
) -> impl Stream<Item = Vec<S::Item>>
where
    S: Stream + Unpin,
{
    let size = size.max(1);
    // The state: the items, and when the previous chunk took its last
    // (`None` before the session's first chunk).
    futures::stream::unfold(
        (items.fuse(), None::<Instant>),
        move |(mut items, last_taken)| {
            let in_flight = in_flight.clone();
            async move {
                let first = items.next().await?;
                let arrived = Instant::now();
                let mut chunk = Vec::with_capacity(size);
                chunk.push(first);
                take_waiting(&mut items, &mut chunk, size);
                let company_likely = match last_taken {
                    None => true,
                    Some(last) => arrived.duration_since(last) < linger || in_flight.any(),
                };
                let wait =
                    !linger.is_zero() && chunk.len() < size && !items.is_done() && company_likely;
                // Those taken at once were waiting: they count as arrived
                // with the first.
                let mut last_taken = arrived;
                if wait {
                    let deadline = tokio::time::sleep(linger);
                    tokio::pin!(deadline);
                    while chunk.len() < size {
                        tokio::select! {
                            item = items.next() => match item {
                                Some(item) => {
                                    chunk.push(item);
                                    last_taken = Instant::now();
                                }
                                None => break,
                            },
                            () = &mut deadline => break,
                        }
                    }
                }
                Some((chunk, (items, Some(last_taken))))
            }
        },
    )
}

/// Moves the items already waiting into `chunk`, up to `size`, without
/// waiting for any.
fn take_waiting<S: Stream + Unpin>(
    items: &mut futures::stream::Fuse<S>,
    chunk: &mut Vec<S::Item>,
    size: usize,
) {
    while chunk.len() < size {
        match items.next().now_or_never() {
            Some(Some(item)) => chunk.push(item),
            Some(None) | None => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures::channel::mpsc;

    const LINGER: Duration = Duration::from_millis(50);

    fn channel() -> (mpsc::UnboundedSender<u32>, mpsc::UnboundedReceiver<u32>) {
        mpsc::unbounded()
    }

    /// The next chunk and how long (in paused, so exact, time) it took.
    async fn next(
        chunks: &mut (impl Stream<Item = Vec<u32>> + Unpin),
    ) -> (Option<Vec<u32>>, Duration) {
        let started = Instant::now();
        let chunk = chunks.next().await;
        (chunk, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_chunk_of_a_session_waits_for_the_backlog_to_pour_in() {
        let (tx, items) = channel();
        let mut chunks = Box::pin(chunks(items, 10, LINGER, InFlight::default()));
        tx.unbounded_send(1).unwrap();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.unbounded_send(2).unwrap();
            tx.unbounded_send(3).unwrap();
            tx
        });
        assert_eq!(next(&mut chunks).await, (Some(vec![1, 2, 3]), LINGER));
        drop(sender.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_consumer_on_a_quiet_queue_hands_deliveries_on_at_once() {
        let (tx, items) = channel();
        let mut chunks = Box::pin(chunks(items, 10, LINGER, InFlight::default()));
        tx.unbounded_send(1).unwrap();
        assert_eq!(next(&mut chunks).await, (Some(vec![1]), LINGER));
        // The session is under way, nothing is in flight and the queue is
        // quiet: no waiting.
        tokio::time::sleep(LINGER * 2).await;
        tx.unbounded_send(2).unwrap();
        assert_eq!(next(&mut chunks).await, (Some(vec![2]), Duration::ZERO));
        tokio::time::sleep(LINGER * 2).await;
        tx.unbounded_send(3).unwrap();
        tx.unbounded_send(4).unwrap();
        assert_eq!(
            next(&mut chunks).await,
            (Some(vec![3, 4]), Duration::ZERO),
            "what is waiting is taken"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deliveries_coming_closer_together_than_the_linger_wait_for_company() {
        let (tx, items) = channel();
        let mut chunks = Box::pin(chunks(items, 10, LINGER, InFlight::default()));
        tx.unbounded_send(1).unwrap();
        let _ = next(&mut chunks).await;
        tokio::time::sleep(LINGER * 2).await;
        tx.unbounded_send(2).unwrap();
        assert_eq!(next(&mut chunks).await, (Some(vec![2]), Duration::ZERO));
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.unbounded_send(3).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.unbounded_send(4).unwrap();
            tx
        });
        // 3 comes 10 ms after 2: it waits, and 4 joins it.
        assert_eq!(
            next(&mut chunks).await,
            (Some(vec![3, 4]), LINGER + Duration::from_millis(10))
        );
        drop(sender.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn while_a_chunk_is_in_flight_the_next_waits_for_company() {
        let (tx, items) = channel();
        let in_flight = InFlight::default();
        let mut chunks = Box::pin(chunks(items, 10, LINGER, in_flight.clone()));
        tx.unbounded_send(0).unwrap();
        let _ = next(&mut chunks).await;
        let busy = in_flight.enter();
        tx.unbounded_send(1).unwrap();
        let sender = tokio::spawn(async move {
            for i in 2..=4 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                tx.unbounded_send(i).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.unbounded_send(5).unwrap();
            tx
        });
        assert_eq!(next(&mut chunks).await, (Some(vec![1, 2, 3, 4]), LINGER));
        drop(busy);
        assert_eq!(
            next(&mut chunks).await.0,
            Some(vec![5]),
            "the linger ended the chunk; the next starts with the next delivery"
        );
        drop(sender.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_chunk_goes_at_once_and_the_rest_waits_for_the_next() {
        let (tx, items) = channel();
        let in_flight = InFlight::default();
        let _busy = in_flight.enter();
        let mut chunks = Box::pin(chunks(items, 3, LINGER, in_flight));
        for i in 1..=5 {
            tx.unbounded_send(i).unwrap();
        }
        assert_eq!(
            next(&mut chunks).await,
            (Some(vec![1, 2, 3]), Duration::ZERO)
        );
        drop(tx);
        assert_eq!(
            next(&mut chunks).await,
            (Some(vec![4, 5]), Duration::ZERO),
            "the stream's end cuts the linger short"
        );
        assert_eq!(next(&mut chunks).await.0, None);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_linger_only_what_is_waiting_is_taken() {
        let (tx, items) = channel();
        let in_flight = InFlight::default();
        let _busy = in_flight.enter();
        let mut chunks = Box::pin(chunks(items, 10, Duration::ZERO, in_flight));
        tx.unbounded_send(1).unwrap();
        tx.unbounded_send(2).unwrap();
        assert_eq!(next(&mut chunks).await, (Some(vec![1, 2]), Duration::ZERO));
        tx.unbounded_send(3).unwrap();
        assert_eq!(next(&mut chunks).await, (Some(vec![3]), Duration::ZERO));
    }

    #[test]
    fn a_panicking_chunk_leaves_the_count() {
        let in_flight = InFlight::default();
        let guard = in_flight.clone();
        let _ = std::panic::catch_unwind(move || {
            let _busy = guard.enter();
            panic!("handler panicked");
        });
        assert!(!in_flight.any());
    }
}
