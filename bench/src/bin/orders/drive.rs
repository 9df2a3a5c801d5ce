//! Placing the orders: the warm-up left out of the figures, then the
//! measured run, at a concurrency or at a fixed rate.

use crate::Args;
use crate::smtp::{Arrivals, emails_arrived};
use crate::system::place_order;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Places the warm-up orders (8 at a time), waits for their emails, and
/// forgets them.
pub async fn warm_up(
    args: &Args,
    http: &reqwest::Client,
    arrivals: &Arrivals,
) -> anyhow::Result<()> {
    if args.warm_up == 0 {
        return Ok(());
    }
    let warm = futures::stream::iter(0..args.warm_up)
        .map(|i| place_order(http, i))
        .buffer_unordered(8)
        .filter(|placed| std::future::ready(placed.is_some()))
        .count()
        .await;
    if warm != args.warm_up {
        anyhow::bail!("{warm} of {} warm-up orders accepted", args.warm_up);
    }
    if !emails_arrived(arrivals, warm, Duration::from_secs(120)).await {
        anyhow::bail!("the warm-up orders' emails did not all arrive within 2 minutes");
    }
    arrivals
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .clear();
    Ok(())
}

/// The measured run as the HTTP client saw it.
pub struct Driven {
    /// When the first order was POSTed.
    pub started: Instant,
    /// The same moment on the wall clock, which `order_events` uses.
    pub started_wall: SystemTime,
    /// Each accepted order's id and when it was POSTed.
    pub posted: HashMap<String, Instant>,
    /// When each accepted order's 202 came.
    pub accepted_at: Vec<Instant>,
    /// The fixed rate orders were offered at, if one.
    pub rate: Option<f64>,
}

impl Driven {
    pub fn accepted(&self) -> usize {
        self.accepted_at.len()
    }

    /// From the first POST to the last 202.
    pub fn accept_secs(&self) -> f64 {
        self.accepted_at
            .iter()
            .max()
            .map(|t| (*t - self.started).as_secs_f64())
            .unwrap_or(f64::NAN)
    }
}

/// POSTs `args.orders` orders, keeping `args.concurrency` in flight or
/// offering them at `args.rate`.
pub async fn drive(args: &Args, http: &reqwest::Client) -> Driven {
    let posted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let rate = args.rate.filter(|r| *r > 0.0);
    // At a fixed rate every order is in flight from its start time on.
    let in_flight = if rate.is_some() {
        args.orders.max(1)
    } else {
        args.concurrency
    };
    let started = Instant::now();
    let started_wall = SystemTime::now();
    let results = futures::stream::iter(0..args.orders)
        .map(|i| {
            let http = http.clone();
            let posted = posted.clone();
            async move {
                if let Some(rate) = rate {
                    tokio::time::sleep_until(
                        (started + Duration::from_secs_f64(i as f64 / rate)).into(),
                    )
                    .await;
                }
                let t = Instant::now();
                let (id, accepted_at) = place_order(&http, i).await?;
                posted.lock().ok()?.insert(id, t);
                Some(accepted_at)
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await;
    let posted = posted.lock().map(|p| p.clone()).unwrap_or_default();
    Driven {
        started,
        started_wall,
        posted,
        accepted_at: results.into_iter().flatten().collect(),
        rate,
    }
}
