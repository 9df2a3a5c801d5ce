//! The order saga: owns the order state machine
//! `PENDING → STOCK_RESERVED → PAID → CONFIRMED`, or `CANCELLED` with a
//! reason, and compensates every step it took (release stock, refund).
//!
//! Each transition locks the order row, so the messages of one order are
//! applied one after the other whatever their arrival order; a message that
//! no longer fits the order's state (a payment result after a cancel) is
//! answered with the compensation it calls for, or ignored, never crashed on.

use contract::Domain;
use contract::{
    CancelOrder, ChargePayment, CommitStock, Item, Line, OrderCancelled, OrderConfirmed,
    OutOfStock, PaymentCharged, PaymentDeclined, PaymentRefunded, PaymentTimeout, PlaceOrder,
    RefundPayment, ReleaseStock, ReserveStock, SetPrice, StockReleased, StockReserved,
};
pub mod pricing;
pub mod saga;

pub use pricing::Pricing;

pub use saga::{Status, reason};

use runtime::config::{ConfigError, Source, Var};
use runtime::{
    Context, Envelope, Failure, Fresh, Handler, Outgoing, Together, Worker, WorkerSettings,
    WorkerSpec,
};
use saga::{Command, Event, decide};
use sqlx::PgConnection;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tracing::{error, info};
use uuid::Uuid;

pub const SPEC: WorkerSpec = WorkerSpec::of(Domain::Order);

/// `PAYMENT_TIMEOUT`: how long the saga waits for a payment result.
const PAYMENT_TIMEOUT: Var = Var::new("PAYMENT_TIMEOUT", "30s");

/// The order worker's settings tree.
#[derive(Debug, Clone)]
pub struct Settings {
    pub worker: WorkerSettings,
    pub payment_timeout: Duration,
    /// `PRICES`: whose prices orders are charged.
    pub pricing: Pricing,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::read(&Source::environment())
    }

    pub fn read(source: &Source) -> Result<Self, ConfigError> {
        Ok(Self {
            worker: WorkerSettings::read::<OrderSaga>(source)?,
            payment_timeout: source.duration(PAYMENT_TIMEOUT)?,
            pricing: source.parse(pricing::PRICES, Pricing::parse)?,
        })
    }

    pub fn log_effective(&self) {
        self.worker.log_effective(SPEC.name);
        tracing::info!(payment_timeout = ?self.payment_timeout, pricing = ?self.pricing, "Effective configuration of the saga");
    }
}

/// Builds the worker, pricing orders from the catalog: database pool and
/// migrations; the broker comes in `run`.
pub async fn build(
    settings: WorkerSettings,
    payment_timeout: Duration,
) -> anyhow::Result<Worker<OrderSaga>> {
    let saga = OrderSaga {
        payment_timeout,
        pricing: Pricing::Catalog,
    };
    Worker::build(SPEC, settings, saga).await
}

contract::inbound! {
    /// What the saga consumes: the publisher's commands, its own timeouts,
    /// and the results of the steps it asked for.
    pub enum OrderMessage for Domain::Order {
        Place(PlaceOrder),
        Cancel(CancelOrder),
        PaymentTimeout(PaymentTimeout),
        SetPrice(SetPrice),
        StockReserved(StockReserved),
        OutOfStock(OutOfStock),
        StockReleased(StockReleased),
        PaymentCharged(PaymentCharged),
        PaymentDeclined(PaymentDeclined),
        PaymentRefunded(PaymentRefunded),
    }
}

/// Orders given up in one deadline scan transaction; a longer backlog is
/// worked off in further scans at once.
const DEADLINES_PER_SCAN: i64 = 100;

pub struct OrderSaga {
    pub payment_timeout: Duration,
    pub pricing: Pricing,
}

impl Handler for OrderSaga {
    type Message = OrderMessage;

    /// Only database effects: shared transactions need no savepoints.
    const OUTSIDE_EFFECTS: bool = false;

    async fn handle(&self, ctx: &mut Context, message: OrderMessage) -> Result<(), Failure> {
        match message {
            OrderMessage::Place(cmd) => place_order(ctx, cmd, self.pricing).await,
            OrderMessage::SetPrice(cmd) => pricing::set_price(ctx.db(), &cmd).await,
            OrderMessage::Cancel(cmd) => cancel_order(ctx, cmd.order_id).await,
            OrderMessage::PaymentTimeout(cmd) => payment_timed_out(ctx, cmd.order_id).await,
            OrderMessage::StockReserved(ev) => {
                stock_reserved(ctx, ev.order_id, self.payment_timeout).await
            }
            OrderMessage::OutOfStock(ev) => out_of_stock(ctx, ev.order_id).await,
            OrderMessage::StockReleased(_) => Ok(()),
            OrderMessage::PaymentCharged(ev) => payment_charged(ctx, ev).await,
            OrderMessage::PaymentDeclined(ev) => payment_declined(ctx, ev.order_id).await,
            OrderMessage::PaymentRefunded(ev) => payment_refunded(ctx, ev).await,
        }
    }

    /// Often enough that a payment is given up within a tenth of its
    /// timeout, at most once a second, at least every 100 ms.
    fn deadline_scan_every(&self) -> Option<Duration> {
        Some((self.payment_timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(1)))
    }

    /// Cancels the orders whose payment did not answer in time. The rows are
    /// taken with `SKIP LOCKED`: replicas scanning side by side split them,
    /// and an order a message is changing right now waits for the next scan.
    async fn expire_deadlines(&self, ctx: &mut Context) -> Result<usize, Failure> {
        let due: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM orders.orders WHERE status = 'STOCK_RESERVED' AND payment_due_at <= now() \
             ORDER BY payment_due_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(DEADLINES_PER_SCAN)
        .fetch_all(ctx.db())
        .await?;
        for &id in &due {
            match ctx
                .isolated(async |ctx| payment_timed_out(ctx, id).await)
                .await
            {
                Ok(()) => {}
                Err(failure) if failure.is_retryable() => return Err(failure),
                Err(failure) => {
                    // One order that cannot be cancelled must not hold
                    // back every deadline after it, scan after scan: it is
                    // logged and tried again a payment timeout later.
                    error!(order_id = %id, error = %failure, "Payment deadline failed; trying again later");
                    postpone_payment_deadline(ctx, id, self.payment_timeout).await?;
                }
            }
        }
        Ok(due.len())
    }

    /// Every message locks its order's row; a price, its product's.
    fn lock_key(&self, message: &OrderMessage) -> Option<String> {
        match message {
            OrderMessage::SetPrice(cmd) => Some(cmd.sku.clone()),
            message => order_id(message).map(|id| id.to_string()),
        }
    }

    /// The common steps of many orders in one statement each: new orders,
    /// reservations, confirmations. Only an order's one message of the
    /// chunk is taken (its outcome cannot depend on the others), and only
    /// where the order is in the state the step expects; the rest is left
    /// for `handle`, which looks closer.
    async fn handle_together(
        &self,
        ctx: &mut Together,
        messages: Vec<Fresh<OrderMessage>>,
    ) -> Result<Vec<Fresh<OrderMessage>>, Failure> {
        let (alone, mut left) = Fresh::partition_unique(messages, order_id);
        let mut placing = Vec::new();
        let mut reserved = Vec::new();
        let mut charged = Vec::new();
        for Fresh { envelope, message } in alone {
            match message {
                OrderMessage::Place(cmd) => placing.push((envelope, cmd)),
                message @ OrderMessage::StockReserved(_) => {
                    reserved.push(Fresh { envelope, message });
                }
                message @ OrderMessage::PaymentCharged(_) => {
                    charged.push(Fresh { envelope, message });
                }
                message => left.push(Fresh { envelope, message }),
            }
        }
        if !placing.is_empty() {
            let skus: Vec<&str> = placing
                .iter()
                .flat_map(|(_, cmd)| cmd.items.iter().map(|l| l.sku.as_str()))
                .collect();
            let catalog = pricing::Catalog::load(ctx.db(), &skus).await?;
            let mut envelopes: Vec<Envelope> = Vec::new();
            let mut orders = Vec::new();
            for (envelope, cmd) in placing {
                match pricing::price(&cmd, &catalog, self.pricing) {
                    Ok(priced) => {
                        envelopes.push(envelope);
                        orders.push(NewOrder { cmd, priced });
                    }
                    // `handle` refuses it.
                    Err(_) => left.push(Fresh {
                        envelope,
                        message: OrderMessage::Place(cmd),
                    }),
                }
            }
            let placed: HashSet<Uuid> = place_many(ctx.db(), &orders).await?.into_iter().collect();
            for (envelope, order) in envelopes.iter().zip(&orders) {
                // Not placed: placed before under another message id.
                if placed.contains(&order.cmd.order_id) {
                    ctx.emit(envelope, order.first_step());
                }
            }
        }
        let reserving = Change::stock_reserved(self.payment_timeout);
        let charge = |order: &Order, _| vec![charge_payment(order)];
        advance_together(ctx, reserved, reserving, charge, &mut left).await?;
        let confirm = |order: &Order, lines| confirmation(order, lines).into();
        advance_together(ctx, charged, Change::confirmed(), confirm, &mut left).await?;
        Ok(left)
    }
}

/// The order a message is about; a price is about none.
fn order_id(message: &OrderMessage) -> Option<Uuid> {
    Some(match message {
        OrderMessage::Place(m) => m.order_id,
        OrderMessage::Cancel(m) => m.order_id,
        OrderMessage::PaymentTimeout(m) => m.order_id,
        OrderMessage::SetPrice(_) => return None,
        OrderMessage::StockReserved(m) => m.order_id,
        OrderMessage::OutOfStock(m) => m.order_id,
        OrderMessage::StockReleased(m) => m.order_id,
        OrderMessage::PaymentCharged(m) => m.order_id,
        OrderMessage::PaymentDeclined(m) => m.order_id,
        OrderMessage::PaymentRefunded(m) => m.order_id,
    })
}

/// The charge a `payment.charged` event records on its order.
fn charge_id(message: &OrderMessage) -> Option<&str> {
    match message {
        OrderMessage::PaymentCharged(ev) => Some(ev.charge_id.as_str()),
        _ => None,
    }
}

/// Applies `change` to the orders of `messages` (one message each) in one
/// statement, emits what `then` makes of each order advanced, caused by its
/// message, and adds the messages of the others (in another state) to
/// `left`, for `handle` to look closer.
async fn advance_together(
    ctx: &mut Together,
    messages: Vec<Fresh<OrderMessage>>,
    change: Change<'_>,
    then: impl Fn(&Order, Vec<Line>) -> Vec<Outgoing>,
    left: &mut Vec<Fresh<OrderMessage>>,
) -> Result<(), Failure> {
    if messages.is_empty() {
        return Ok(());
    }
    let orders: Vec<_> = messages
        .iter()
        .filter_map(|fresh| Some((order_id(&fresh.message)?, charge_id(&fresh.message))))
        .collect();
    let advanced = advance_many(ctx.db(), &orders, change).await?;
    let mut causes: HashMap<Uuid, Fresh<OrderMessage>> = messages
        .into_iter()
        .filter_map(|fresh| Some((order_id(&fresh.message)?, fresh)))
        .collect();
    for (order, lines) in advanced {
        if let Some(cause) = causes.remove(&order.id) {
            for message in then(&order, lines) {
                ctx.emit(&cause.envelope, message);
            }
        }
    }
    left.extend(causes.into_values());
    Ok(())
}

/// The order as the saga needs it, read under a row lock.
struct Order {
    id: Uuid,
    status: Status,
    customer_email: String,
    currency: String,
    total_cents: u64,
    payment_method: String,
}

async fn lock_order(ctx: &mut Context, id: Uuid) -> Result<Option<Order>, Failure> {
    let row: Option<(String, String, String, i64, String)> = sqlx::query_as(
        "SELECT status, customer_email, currency, total_cents, payment_method \
         FROM orders.orders WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(ctx.db())
    .await?;
    row.map(
        |(status, customer_email, currency, total, payment_method)| {
            Ok(Order {
                id,
                status: Status::parse(&status).ok_or_else(|| {
                    Failure::permanent(format!("unknown order status {status:?}"))
                })?,
                customer_email,
                currency,
                total_cents: u64::try_from(total).unwrap_or_default(),
                payment_method,
            })
        },
    )
    .transpose()
}

/// A status change as [`advance`] applies it: from `from` through `steps`
/// (a history row each, the status ends at the last).
struct Change<'a> {
    from: Status,
    steps: &'a [Status],
    /// On the order and each history row.
    reason: Option<&'a str>,
    /// Whether the order's lines come back with it.
    with_lines: bool,
    /// Sets the payment deadline this far from now.
    payment_due_in: Option<Duration>,
}

impl<'a> Change<'a> {
    fn new(from: Status, steps: &'a [Status]) -> Self {
        Self {
            from,
            steps,
            reason: None,
            with_lines: false,
            payment_due_in: None,
        }
    }
}

impl Change<'static> {
    /// `PENDING → STOCK_RESERVED`, the payment due `payment_timeout` from
    /// now. The deadline is a row the saga scans (`expire_deadlines`), not
    /// a message held by the broker: nothing per order crosses the broker
    /// unless the payment really is late (decision 0008).
    fn stock_reserved(payment_timeout: Duration) -> Self {
        Self {
            payment_due_in: Some(payment_timeout),
            ..Self::new(Status::Pending, &[Status::StockReserved])
        }
    }

    /// `STOCK_RESERVED → PAID → CONFIRMED` at once (nothing sits between
    /// them), with the lines the confirmation and the stock commit need.
    fn confirmed() -> Self {
        Self {
            with_lines: true,
            ..Self::new(Status::StockReserved, &[Status::Paid, Status::Confirmed])
        }
    }
}

/// Applies `change` in one statement if the order is in `change.from`;
/// returns the order as it now is, with its lines if asked. `None`: the
/// order is in another state or unknown, and the caller looks closer.
/// `charge_id` is recorded on the order if given.
async fn advance(
    ctx: &mut Context,
    id: Uuid,
    charge_id: Option<&str>,
    change: Change<'_>,
) -> Result<Option<(Order, Vec<Line>)>, Failure> {
    Ok(advance_many(ctx.db(), &[(id, charge_id)], change)
        .await?
        .pop())
}

/// [`advance`] for several orders in one statement (each with the charge
/// id to record, if any): returns those that were in `change.from`, now
/// changed. Orders are locked in the order given.
async fn advance_many(
    db: &mut PgConnection,
    orders: &[(Uuid, Option<&str>)],
    change: Change<'_>,
) -> Result<Vec<(Order, Vec<Line>)>, Failure> {
    let Change {
        from,
        steps,
        reason,
        with_lines,
        payment_due_in,
    } = change;
    let Some(&to) = steps.last() else {
        return Ok(Vec::new());
    };
    let due_in_ms = payment_due_in.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    type Row = (
        Uuid,
        String,
        String,
        i64,
        String,
        Option<Vec<String>>,
        Option<Vec<i32>>,
        Option<Vec<i64>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "WITH input AS (SELECT * FROM UNNEST($1::uuid[], $4::text[]) WITH ORDINALITY AS i(id, charge_id, n)), \
         changed AS (UPDATE orders.orders o SET status = $3, charge_id = COALESCE(i.charge_id, o.charge_id), \
         reason = $6, payment_due_at = COALESCE(now() + $8 * interval '1 millisecond', o.payment_due_at), \
         updated_at = now() FROM input i WHERE o.id = i.id AND o.status = $2 \
         RETURNING o.id, i.n, o.customer_email, o.currency, o.total_cents, o.payment_method), \
         logged AS (INSERT INTO orders.order_events (order_id, status, reason) \
         SELECT changed.id, step.status, $6 FROM changed, \
         UNNEST($5::text[]) WITH ORDINALITY AS step(status, n) ORDER BY changed.n, step.n) \
         SELECT c.id, c.customer_email, c.currency, c.total_cents, c.payment_method, l.skus, l.quantities, l.prices \
         FROM changed c LEFT JOIN LATERAL (SELECT array_agg(i.sku ORDER BY i.line) AS skus, \
         array_agg(i.quantity ORDER BY i.line) AS quantities, array_agg(i.unit_price_cents ORDER BY i.line) AS prices \
         FROM orders.order_items i WHERE $7 AND i.order_id = c.id) l ON true ORDER BY c.n",
    )
    .bind(orders.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind(from.as_str())
    .bind(to.as_str())
    .bind(orders.iter().map(|(_, c)| *c).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    .bind(reason)
    .bind(with_lines)
    .bind(due_in_ms)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, customer_email, currency, total, payment_method, skus, quantities, prices)| {
                let mut previous = from;
                for &step in steps {
                    info!(order_id = %id, from = previous.as_str(), to = step.as_str(), reason, "Order status changed");
                    previous = step;
                }
                let lines = skus
                    .unwrap_or_default()
                    .into_iter()
                    .zip(quantities.unwrap_or_default())
                    .zip(prices.unwrap_or_default())
                    .map(|((sku, quantity), price)| Line {
                        sku,
                        quantity: u32::try_from(quantity).unwrap_or_default(),
                        unit_price_cents: u64::try_from(price).unwrap_or_default(),
                    })
                    .collect();
                let order = Order {
                    id,
                    status: to,
                    customer_email,
                    currency,
                    total_cents: u64::try_from(total).unwrap_or_default(),
                    payment_method,
                };
                (order, lines)
            },
        )
        .collect())
}

/// An event about an order this saga has not stored yet can only be early
/// (or a replay from another deployment): retry it later.
async fn existing_order(ctx: &mut Context, id: Uuid) -> Result<Order, Failure> {
    lock_order(ctx, id)
        .await?
        .ok_or_else(|| Failure::transient(format!("order {id} is not known (yet)")))
}

/// Moves a locked order to `to`. The one place for a status change is
/// [`advance`], so every change writes its history row.
async fn transition(
    ctx: &mut Context,
    order: &Order,
    to: Status,
    reason: Option<&str>,
) -> Result<(), Failure> {
    // The row is locked in `order.status`, so the conditional change applies.
    let steps = [to];
    let change = Change {
        reason,
        ..Change::new(order.status, &steps)
    };
    match advance(ctx, order.id, None, change).await? {
        Some(_) => Ok(()),
        None => Err(Failure::transient(format!(
            "order {} changed under its row lock",
            order.id
        ))),
    }
}

fn emit<M: runtime::Message>(ctx: &mut Context, order_id: Uuid, message: &M) {
    ctx.emit(Outgoing::of(message).correlated(order_id));
}

/// A `PlaceOrder` priced, ready to be stored: placed, or cancelled at
/// once when the catalog refuses it.
struct NewOrder {
    cmd: PlaceOrder,
    priced: pricing::Priced,
}

impl NewOrder {
    /// What the saga sends once the order is stored: the reservation of
    /// its stock, or the announcement of its cancellation.
    fn first_step(&self) -> Outgoing {
        let cmd = &self.cmd;
        if let Some((reason, detail)) = &self.priced.refused {
            info!(order_id = %cmd.order_id, reason, detail, "Order cancelled at placement");
            return Outgoing::of(&OrderCancelled {
                order_id: cmd.order_id,
                customer_email: cmd.customer_email.clone(),
                currency: cmd.currency.clone(),
                total_cents: 0,
                reason: (*reason).to_owned(),
                refunded: false,
            })
            .correlated(cmd.order_id);
        }
        info!(order_id = %cmd.order_id, total_cents = self.priced.total_cents, "Order placed");
        let items = cmd
            .items
            .iter()
            .map(|l| Item {
                sku: l.sku.clone(),
                quantity: l.quantity,
            })
            .collect();
        Outgoing::of(&ReserveStock {
            order_id: cmd.order_id,
            items,
        })
        .correlated(cmd.order_id)
    }
}

async fn place_order(ctx: &mut Context, cmd: PlaceOrder, prices: Pricing) -> Result<(), Failure> {
    let skus: Vec<&str> = cmd.items.iter().map(|l| l.sku.as_str()).collect();
    let catalog = pricing::Catalog::load(ctx.db(), &skus).await?;
    let priced = pricing::price(&cmd, &catalog, prices)?;
    let order = NewOrder { cmd, priced };
    // Placed before under another message id: nothing more to do.
    if !place_many(ctx.db(), std::slice::from_ref(&order))
        .await?
        .is_empty()
    {
        ctx.emit(order.first_step());
    }
    Ok(())
}

/// Stores the orders (distinct ids), their lines and their first history
/// rows in one statement (`PENDING`, then `CANCELLED` with its reason for
/// an order the catalog refused); the lines and rows only for orders that
/// are new. Returns the ids of the new ones.
async fn place_many(db: &mut PgConnection, orders: &[NewOrder]) -> Result<Vec<Uuid>, Failure> {
    let mut lines = Lines::default();
    for order in orders {
        for (n, (l, price)) in order.cmd.items.iter().zip(&order.priced.prices).enumerate() {
            lines.order_ids.push(order.cmd.order_id);
            lines.lines.push(i32::try_from(n + 1).unwrap_or(i32::MAX));
            lines.skus.push(l.sku.as_str());
            lines
                .quantities
                .push(i32::try_from(l.quantity).unwrap_or(i32::MAX));
            lines.prices.push(*price);
        }
    }
    let refused = |o: &NewOrder| o.priced.refused.as_ref().map(|(why, _)| *why);
    let placed: Vec<Uuid> = sqlx::query_scalar(
        "WITH placed AS (INSERT INTO orders.orders (id, customer_email, currency, total_cents, payment_method, status, reason, placed_by) \
         SELECT o.id, o.email, o.currency, o.total, o.method, \
         CASE WHEN o.reason IS NULL THEN 'PENDING' ELSE 'CANCELLED' END, o.reason, o.placed_by \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::text[], $11::text[], $12::text[]) AS o(id, email, currency, total, method, reason, placed_by) \
         ON CONFLICT (id) DO NOTHING RETURNING id, reason), \
         lines AS (INSERT INTO orders.order_items (order_id, line, sku, quantity, unit_price_cents) \
         SELECT l.order_id, l.line, l.sku, l.quantity, l.price \
         FROM UNNEST($6::uuid[], $7::int[], $8::text[], $9::int[], $10::int8[]) AS l(order_id, line, sku, quantity, price) \
         WHERE l.order_id IN (SELECT id FROM placed)), \
         logged AS (INSERT INTO orders.order_events (order_id, status, reason) \
         SELECT e.id, e.status, e.reason FROM ( \
         SELECT id, 'PENDING' AS status, NULL::text AS reason, 1 AS step FROM placed \
         UNION ALL SELECT id, 'CANCELLED', reason, 2 FROM placed WHERE reason IS NOT NULL) e \
         ORDER BY e.step) \
         SELECT id FROM placed",
    )
    .bind(orders.iter().map(|o| o.cmd.order_id).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.cmd.customer_email.as_str()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.cmd.currency.as_str()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.priced.total_cents).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.cmd.payment_method.as_str()).collect::<Vec<_>>())
    .bind(&lines.order_ids)
    .bind(&lines.lines)
    .bind(&lines.skus)
    .bind(&lines.quantities)
    .bind(&lines.prices)
    .bind(orders.iter().map(refused).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.cmd.placed_by.as_deref()).collect::<Vec<_>>())
    .fetch_all(db)
    .await?;
    Ok(placed)
}

/// Order lines as the columns of one `UNNEST`.
#[derive(Default)]
struct Lines<'a> {
    order_ids: Vec<Uuid>,
    lines: Vec<i32>,
    skus: Vec<&'a str>,
    quantities: Vec<i32>,
    prices: Vec<Option<i64>>,
}

async fn stock_reserved(
    ctx: &mut Context,
    id: Uuid,
    payment_timeout: Duration,
) -> Result<(), Failure> {
    // The common case in one statement.
    let change = Change::stock_reserved(payment_timeout);
    if let Some((order, _)) = advance(ctx, id, None, change).await? {
        ctx.emit(charge_payment(&order));
        return Ok(());
    }
    let order = existing_order(ctx, id).await?;
    carry_out(ctx, &order, Event::StockReserved).await
}

/// Carries out what the state machine (`saga.rs`) decides for `event`
/// about a locked order. The steps along the happy path are taken by their
/// one-statement path (`advance`) before the order is locked: finding the
/// order still where such a step starts means it changed under its lock.
async fn carry_out(ctx: &mut Context, order: &Order, event: Event) -> Result<(), Failure> {
    let decision = decide(order.status, event);
    match decision.steps {
        [] => {}
        [Status::Cancelled] => {
            transition(ctx, order, Status::Cancelled, decision.reason).await?;
        }
        _ => {
            return Err(Failure::transient(format!(
                "order {} is still {} after advancing it",
                order.id,
                order.status.as_str()
            )));
        }
    }
    let id = order.id;
    for command in decision.commands {
        match command {
            Command::ReleaseStock => emit(ctx, id, &ReleaseStock { order_id: id }),
            Command::RefundPayment => emit(ctx, id, &RefundPayment { order_id: id }),
            Command::AnnounceCancelled { refunded } => {
                let why = decision.reason.unwrap_or_default();
                announce_cancellation(ctx, order, why, refunded);
            }
            // Sent only by the one-statement steps, with what they return.
            Command::ChargePayment | Command::Confirm => {
                return Err(Failure::transient(format!(
                    "order {id}: {command:?} outside its step"
                )));
            }
        }
    }
    Ok(())
}

/// What the saga asks of the payment worker once the stock is reserved.
fn charge_payment(order: &Order) -> Outgoing {
    Outgoing::of(&ChargePayment {
        order_id: order.id,
        amount_cents: order.total_cents,
        currency: order.currency.clone(),
        payment_method: order.payment_method.clone(),
    })
    .correlated(order.id)
}

/// What a confirmed order sends: the stock commit and the announcement.
fn confirmation(order: &Order, lines: Vec<Line>) -> [Outgoing; 2] {
    let mut skus: Vec<String> = lines.iter().map(|l| l.sku.clone()).collect();
    skus.sort();
    skus.dedup();
    [
        Outgoing::of(&CommitStock {
            order_id: order.id,
            skus,
        })
        .correlated(order.id),
        Outgoing::of(&OrderConfirmed {
            order_id: order.id,
            customer_email: order.customer_email.clone(),
            currency: order.currency.clone(),
            total_cents: order.total_cents,
            items: lines,
        })
        .correlated(order.id),
    ]
}

async fn out_of_stock(ctx: &mut Context, id: Uuid) -> Result<(), Failure> {
    let order = existing_order(ctx, id).await?;
    carry_out(ctx, &order, Event::OutOfStock).await
}

async fn payment_charged(ctx: &mut Context, ev: PaymentCharged) -> Result<(), Failure> {
    // In one statement: the charge, the status and both history rows.
    let change = Change::confirmed();
    let confirmed = advance(ctx, ev.order_id, Some(ev.charge_id.as_str()), change).await?;
    if let Some((order, lines)) = confirmed {
        for message in confirmation(&order, lines) {
            ctx.emit(message);
        }
        return Ok(());
    }
    let order = existing_order(ctx, ev.order_id).await?;
    carry_out(ctx, &order, Event::PaymentCharged).await
}

async fn payment_declined(ctx: &mut Context, id: Uuid) -> Result<(), Failure> {
    let order = existing_order(ctx, id).await?;
    carry_out(ctx, &order, Event::PaymentDeclined).await
}

async fn postpone_payment_deadline(
    ctx: &mut Context,
    id: Uuid,
    by: Duration,
) -> Result<(), Failure> {
    sqlx::query(
        "UPDATE orders.orders SET payment_due_at = now() + $2 * interval '1 millisecond' WHERE id = $1",
    )
    .bind(id)
    .bind(i64::try_from(by.as_millis()).unwrap_or(i64::MAX))
    .execute(ctx.db())
    .await?;
    Ok(())
}

/// Cancels an order still waiting for its payment: the stock goes back and
/// the payment is voided (or refunded, if the charge lands after all).
async fn payment_timed_out(ctx: &mut Context, id: Uuid) -> Result<(), Failure> {
    let order = existing_order(ctx, id).await?;
    carry_out(ctx, &order, Event::PaymentTimedOut).await
}

async fn cancel_order(ctx: &mut Context, id: Uuid) -> Result<(), Failure> {
    let order = existing_order(ctx, id).await?;
    carry_out(ctx, &order, Event::CancelRequested).await
}

async fn payment_refunded(ctx: &mut Context, ev: PaymentRefunded) -> Result<(), Failure> {
    if !ev.charge_ids.is_empty() {
        sqlx::query("UPDATE orders.orders SET refunded = true, updated_at = now() WHERE id = $1")
            .bind(ev.order_id)
            .execute(ctx.db())
            .await?;
        info!(order_id = %ev.order_id, charges = ?ev.charge_ids, "Order refunded");
    }
    Ok(())
}

fn announce_cancellation(ctx: &mut Context, order: &Order, reason: &str, refunded: bool) {
    emit(
        ctx,
        order.id,
        &OrderCancelled {
            order_id: order.id,
            customer_email: order.customer_email.clone(),
            currency: order.currency.clone(),
            total_cents: order.total_cents,
            reason: reason.to_owned(),
            refunded,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-statement steps take the state machine's path.
    #[test]
    fn the_common_steps_are_the_state_machine_s() {
        let reserved = Change::stock_reserved(Duration::from_secs(30));
        let decision = decide(reserved.from, Event::StockReserved);
        assert_eq!(reserved.steps, decision.steps);
        assert_eq!(reserved.from, Status::Pending);
        assert_eq!(decision.commands, vec![Command::ChargePayment]);
        let confirmed = Change::confirmed();
        let decision = decide(confirmed.from, Event::PaymentCharged);
        assert_eq!(confirmed.steps, decision.steps);
        assert_eq!(confirmed.from, Status::StockReserved);
        assert_eq!(decision.commands, vec![Command::Confirm]);
    }
}
