//! The inventory domain: reserve all items of an order or none, release,
//! commit and restock. Stock never goes negative: the rows of an order's
//! SKUs are locked in SKU order while it is checked and changed, and the
//! table's CHECK constraints hold the line if code ever gets it wrong.

use messages::{
    CommitStock, Item, OutOfStock, ReleaseStock, ReserveStock, Restock, StockReleased,
    StockReserved,
};
use runtime::{
    Context, Failure, Handler, Inbound, Malformed, Outgoing, Worker, WorkerSettings, WorkerSpec,
    decode_json,
};
use std::collections::BTreeMap;
use topology::{Domain, keys};
use tracing::info;

pub const SPEC: WorkerSpec = WorkerSpec {
    name: "inventory-worker",
    domain: Domain::Inventory,
    schema: "inventory",
};

/// Builds the worker: database pool and migrations; the broker comes in `run`.
pub async fn build(settings: WorkerSettings) -> anyhow::Result<Worker<Inventory>> {
    Worker::build(SPEC, settings, Inventory).await
}

pub enum InventoryMessage {
    Reserve(ReserveStock),
    Release(ReleaseStock),
    Commit(CommitStock),
    Restock(Restock),
}

impl Inbound for InventoryMessage {
    fn decode(kind: &str, body: &[u8]) -> Result<Self, Malformed> {
        Ok(match kind {
            keys::INVENTORY_RESERVE => Self::Reserve(decode_json(kind, body)?),
            keys::INVENTORY_RELEASE => Self::Release(decode_json(kind, body)?),
            keys::INVENTORY_COMMIT => Self::Commit(decode_json(kind, body)?),
            keys::INVENTORY_RESTOCK => Self::Restock(decode_json(kind, body)?),
            other => return Err(Malformed::UnknownType(other.to_owned())),
        })
    }
}

pub struct Inventory;

impl Handler for Inventory {
    type Message = InventoryMessage;

    /// Only database effects: shared transactions need no savepoints.
    const OUTSIDE_EFFECTS: bool = false;

    async fn handle(&self, ctx: &mut Context, message: InventoryMessage) -> Result<(), Failure> {
        match message {
            InventoryMessage::Reserve(cmd) => reserve_stock(ctx, cmd).await,
            InventoryMessage::Release(cmd) => release_stock(ctx, cmd).await,
            InventoryMessage::Commit(cmd) => commit_stock(ctx, cmd).await,
            InventoryMessage::Restock(cmd) => restock(ctx, cmd).await,
        }
    }

    /// Stock rows are the hot ones (every order of a SKU takes its row):
    /// the smallest SKU a message touches, which is also the first it locks.
    fn lock_key(&self, message: &InventoryMessage) -> Option<String> {
        match message {
            InventoryMessage::Reserve(cmd) => cmd.items.iter().map(|i| i.sku.clone()).min(),
            InventoryMessage::Commit(cmd) => cmd.skus.first().cloned(),
            InventoryMessage::Restock(cmd) => Some(cmd.sku.clone()),
            // Its SKUs are known only from the reservation rows.
            InventoryMessage::Release(_) => None,
        }
    }
}

/// Sums the quantities per SKU (an order may name a SKU twice).
fn wanted(items: &[Item]) -> Result<BTreeMap<String, i64>, Failure> {
    let mut wanted = BTreeMap::new();
    for item in items {
        if item.sku.is_empty() || item.quantity == 0 {
            return Err(Failure::permanent(format!(
                "invalid item {:?} x {}",
                item.sku, item.quantity
            )));
        }
        *wanted.entry(item.sku.clone()).or_insert(0) += i64::from(item.quantity);
    }
    if wanted.is_empty() {
        return Err(Failure::permanent(
            "an order without items cannot be reserved",
        ));
    }
    Ok(wanted)
}

async fn reserve_stock(ctx: &mut Context, cmd: ReserveStock) -> Result<(), Failure> {
    let wanted = wanted(&cmd.items)?;
    let skus: Vec<String> = wanted.keys().cloned().collect();
    let quantities: Vec<i64> = wanted.values().copied().collect();
    // One statement decides and reserves. `locked` takes the SKUs' rows in
    // SKU order (the lock order of every stock writer, so concurrent orders
    // cannot deadlock or both take the last unit) and is evaluated, as the
    // uncorrelated subquery `go`, before the update touches any row; the
    // update and the reservation happen only if this order holds no
    // reservation yet (reservations name stocked SKUs only, so one that
    // holds one is seen) and every SKU has enough.
    let (already, short): (bool, Vec<String>) = sqlx::query_as(
        "WITH w AS (SELECT * FROM UNNEST($2::text[], $3::int8[]) AS w(sku, q)), \
         locked AS MATERIALIZED (SELECT sku, available FROM inventory.stock WHERE sku = ANY($2) ORDER BY sku FOR UPDATE), \
         held AS MATERIALIZED (SELECT EXISTS (SELECT 1 FROM inventory.reservations WHERE order_id = $1) AS already), \
         short AS MATERIALIZED (SELECT w.sku FROM w LEFT JOIN locked l ON l.sku = w.sku \
         WHERE l.available IS NULL OR l.available < w.q), \
         go AS MATERIALIZED (SELECT NOT (SELECT already FROM held) AND NOT EXISTS (SELECT 1 FROM short) AS ok), \
         taken AS (UPDATE inventory.stock s SET available = s.available - w.q, reserved = s.reserved + w.q \
         FROM w WHERE (SELECT ok FROM go) AND s.sku = w.sku), \
         kept AS (INSERT INTO inventory.reservations (order_id, sku, quantity) \
         SELECT $1, w.sku, w.q FROM w WHERE (SELECT ok FROM go)) \
         SELECT (SELECT already FROM held), ARRAY(SELECT sku FROM short ORDER BY sku)",
    )
    .bind(cmd.order_id)
    .bind(&skus)
    .bind(&quantities)
    .fetch_one(ctx.db())
    .await?;
    if !already {
        if !short.is_empty() {
            info!(order_id = %cmd.order_id, skus = ?short, "Out of stock");
            ctx.emit(
                Outgoing::of(&OutOfStock {
                    order_id: cmd.order_id,
                    skus: short,
                })
                .correlated(cmd.order_id),
            );
            return Ok(());
        }
        info!(order_id = %cmd.order_id, skus = skus.len(), "Stock reserved");
    }
    // Reserved now, or by another message before (a replay with a new id):
    // either way, say so.
    ctx.emit(
        Outgoing::of(&StockReserved {
            order_id: cmd.order_id,
        })
        .correlated(cmd.order_id),
    );
    Ok(())
}

async fn release_stock(ctx: &mut Context, cmd: ReleaseStock) -> Result<(), Failure> {
    let held: Vec<(String, i64, bool)> = sqlx::query_as(
        "DELETE FROM inventory.reservations WHERE order_id = $1 RETURNING sku, quantity, committed",
    )
    .bind(cmd.order_id)
    .fetch_all(ctx.db())
    .await?;
    let mut held = held;
    held.sort();
    for (sku, quantity, committed) in &held {
        let sql = if *committed {
            "UPDATE inventory.stock SET available = available + $2, sold = sold - $2 WHERE sku = $1"
        } else {
            "UPDATE inventory.stock SET available = available + $2, reserved = reserved - $2 WHERE sku = $1"
        };
        sqlx::query(sql)
            .bind(sku)
            .bind(quantity)
            .execute(ctx.db())
            .await?;
    }
    if !held.is_empty() {
        info!(order_id = %cmd.order_id, skus = held.len(), "Stock released");
    }
    ctx.emit(
        Outgoing::of(&StockReleased {
            order_id: cmd.order_id,
        })
        .correlated(cmd.order_id),
    );
    Ok(())
}

async fn commit_stock(ctx: &mut Context, cmd: CommitStock) -> Result<(), Failure> {
    // One statement. `locked` takes the stock rows in SKU order before any
    // is updated (an update needs its row out of `locked`, which yields in
    // order), like every other writer of stock, so orders sharing SKUs never
    // deadlock.
    sqlx::query(
        "WITH done AS (UPDATE inventory.reservations SET committed = true \
         WHERE order_id = $1 AND NOT committed RETURNING sku, quantity), \
         locked AS (SELECT sku FROM inventory.stock WHERE sku IN (SELECT sku FROM done) ORDER BY sku FOR UPDATE) \
         UPDATE inventory.stock s SET reserved = s.reserved - done.quantity, sold = s.sold + done.quantity \
         FROM done, locked WHERE s.sku = done.sku AND locked.sku = done.sku",
    )
    .bind(cmd.order_id)
    .execute(ctx.db())
    .await?;
    Ok(())
}

async fn restock(ctx: &mut Context, cmd: Restock) -> Result<(), Failure> {
    if cmd.sku.is_empty() || cmd.quantity == 0 {
        return Err(Failure::permanent(format!(
            "invalid restock {:?} x {}",
            cmd.sku, cmd.quantity
        )));
    }
    sqlx::query(
        "INSERT INTO inventory.stock (sku, available) VALUES ($1, $2) \
         ON CONFLICT (sku) DO UPDATE SET available = inventory.stock.available + EXCLUDED.available",
    )
    .bind(&cmd.sku)
    .bind(i64::from(cmd.quantity))
    .execute(ctx.db())
    .await?;
    info!(sku = %cmd.sku, quantity = cmd.quantity, "Restocked");
    Ok(())
}
