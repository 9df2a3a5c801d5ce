//! Reading a dead queue one message at a time: each message is taken
//! unacked (`basic.get`) and only what the caller keeps stays in memory, so
//! a page, a search for one message and a replay cost flat memory however
//! deep the queue; closing the channel puts every message not acked back in
//! its place.

use crate::Selectors;
use crate::message::DeadMessage;
use anyhow::{Context, bail};
use chrono::Utc;
use lapin::options::BasicGetOptions;
use lapin::{Channel, Connection};

/// The messages of a queue taken one at a time on `channel`, unacked, up to
/// the depth the queue had when the scan opened (messages dead-lettered
/// meanwhile are not read).
pub struct Scan<'a> {
    channel: &'a Channel,
    queue: &'a str,
    /// The queue's depth when the scan opened.
    pub depth: u32,
    read: u32,
}

impl<'a> Scan<'a> {
    pub async fn open(channel: &'a Channel, queue: &'a str) -> anyhow::Result<Self> {
        let depth = topology::queue_depth(channel, queue)
            .await
            .with_context(|| format!("queue {queue} does not exist"))?;
        Ok(Self {
            channel,
            queue,
            depth,
            read: 0,
        })
    }

    /// The next message, or `None` once the depth is read or the queue is
    /// empty before it (another reader holds the rest).
    pub async fn next(&mut self) -> anyhow::Result<Option<DeadMessage>> {
        if self.read >= self.depth {
            return Ok(None);
        }
        let Some(got) = self
            .channel
            .basic_get(self.queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            return Ok(None);
        };
        self.read += 1;
        let d = got.delivery;
        Ok(Some(DeadMessage::from_delivery(
            d.delivery_tag,
            d.properties,
            d.data,
        )))
    }
}

/// The message `id` of `queue`, read as a scan: it stops at the message,
/// and keeps nothing before it.
pub async fn find(
    connection: &Connection,
    queue: &str,
    id: &str,
) -> anyhow::Result<Option<DeadMessage>> {
    let channel = connection.create_channel().await?;
    let found = async {
        let mut scan = Scan::open(&channel, queue).await?;
        while let Some(m) = scan.next().await? {
            if m.message_id == id {
                return Ok(Some(m));
            }
        }
        Ok::<_, anyhow::Error>(None)
    }
    .await;
    let _ = channel.close(200, "dlq message read".into()).await;
    found
}

/// One page of a dead queue: where it starts, how long it is, and the
/// window of death times it keeps to.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    /// Messages on the page, at most.
    pub limit: usize,
    /// The cursor: the id of the last message of the page before.
    pub after: Option<String>,
    /// Died at or after this.
    pub since: Option<chrono::DateTime<Utc>>,
    /// Died before this.
    pub until: Option<chrono::DateTime<Utc>>,
}

/// A page of a dead queue, and the cursor of the next one.
#[derive(Debug)]
pub struct Page {
    pub messages: Vec<DeadMessage>,
    /// The next page's `after`, when there are more messages to list.
    pub next: Option<String>,
    /// Messages read to make the page (the ones before the cursor too).
    pub scanned: usize,
    pub depth: u32,
}

impl PageRequest {
    fn keeps(&self, m: &DeadMessage) -> bool {
        let died = m.first_failed_at;
        self.since
            .is_none_or(|since| died.is_some_and(|d| d >= since))
            && self
                .until
                .is_none_or(|until| died.is_some_and(|d| d < until))
    }
}

/// A page of `queue`, scanned: only the page's messages are kept, however
/// deep the queue and however far the cursor. Reaching a page costs reading
/// the messages before it.
pub async fn page(
    connection: &Connection,
    queue: &str,
    selectors: &Selectors,
    request: &PageRequest,
) -> anyhow::Result<Page> {
    let channel = connection.create_channel().await?;
    let result = read_page(&channel, queue, selectors, request).await;
    let _ = channel.close(200, "dlq page read".into()).await;
    result
}

async fn read_page(
    channel: &Channel,
    queue: &str,
    selectors: &Selectors,
    request: &PageRequest,
) -> anyhow::Result<Page> {
    let mut scan = Scan::open(channel, queue).await?;
    let now = Utc::now();
    let mut past_cursor = request.after.is_none();
    let mut messages = Vec::with_capacity(request.limit.min(1024));
    let mut next = None;
    while let Some(m) = scan.next().await? {
        if !past_cursor {
            past_cursor = request.after.as_deref() == Some(m.message_id.as_str());
            continue;
        }
        if !selectors.matches(&m, now) || !request.keeps(&m) {
            continue;
        }
        if messages.len() == request.limit {
            next = messages
                .last()
                .map(|last: &DeadMessage| last.message_id.clone());
            break;
        }
        messages.push(m);
    }
    if !past_cursor {
        bail!(
            "message {} (the cursor) is no longer in {queue}: it was replayed or purged; list again from the start",
            request.after.as_deref().unwrap_or_default()
        );
    }
    Ok(Page {
        messages,
        next,
        scanned: scan.read as usize,
        depth: scan.depth,
    })
}
