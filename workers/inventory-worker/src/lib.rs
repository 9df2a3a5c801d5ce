//! The inventory domain: reserve all items of an order or none, release,
//! commit and restock. Stock never goes negative: the rows of an order's
//! SKUs are locked in SKU order while it is checked and changed, and the
//! table's CHECK constraints hold the line if code ever gets it wrong.

use contract::Domain;
use contract::{
    CommitStock, Item, OutOfStock, ReleaseStock, ReserveStock, Restock, StockReleased,
    StockReserved,
};
use runtime::{
    Context, Failure, Fresh, Handler, Outgoing, Together, Worker, WorkerSettings, WorkerSpec,
};
use sqlx::PgConnection;
use std::collections::{BTreeMap, HashMap, HashSet};
use tracing::info;
use uuid::Uuid;

pub const SPEC: WorkerSpec = WorkerSpec::of(Domain::Inventory);

/// Builds the worker: database pool and migrations; the broker comes in `run`.
pub async fn build(settings: WorkerSettings) -> anyhow::Result<Worker<Inventory>> {
    Worker::build(SPEC, settings, Inventory).await
}

contract::inbound! {
    /// What the inventory worker consumes.
    pub enum InventoryMessage for Domain::Inventory {
        Reserve(ReserveStock),
        Release(ReleaseStock),
        Commit(CommitStock),
        Restock(Restock),
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

    /// Reservations and commits of many orders in two statements: lock
    /// every stock row the chunk names, decide each reservation in Rust in
    /// chunk order, then write them and the commits at once. Only an
    /// order's one message of the chunk is taken, and only valid ones;
    /// releases and restocks are left for `handle`.
    async fn handle_together(
        &self,
        ctx: &mut Together,
        messages: Vec<Fresh<InventoryMessage>>,
    ) -> Result<Vec<Fresh<InventoryMessage>>, Failure> {
        let (alone, mut left) = Fresh::partition_unique(messages, order_id);
        let mut reserving = Vec::new();
        let mut committing = Vec::new();
        for Fresh { envelope, message } in alone {
            match message {
                InventoryMessage::Reserve(cmd) => match wanted(&cmd.items) {
                    Ok(wanted) => reserving.push((envelope, cmd.order_id, wanted)),
                    // `handle` refuses it.
                    Err(_) => left.push(Fresh {
                        envelope,
                        message: InventoryMessage::Reserve(cmd),
                    }),
                },
                InventoryMessage::Commit(cmd) => committing.push((envelope, cmd)),
                message => left.push(Fresh { envelope, message }),
            }
        }
        let committed: Vec<Uuid> = committing.iter().map(|(_, cmd)| cmd.order_id).collect();
        let mut rows = Vec::new();
        // Commits alone need no lock first: their statement takes the
        // stock rows in SKU order.
        if !reserving.is_empty() {
            let mut skus: Vec<String> = reserving
                .iter()
                .flat_map(|(_, _, wanted)| wanted.keys().cloned())
                .chain(
                    committing
                        .iter()
                        .flat_map(|(_, cmd)| cmd.skus.iter().cloned()),
                )
                .collect();
            skus.sort();
            skus.dedup();
            let orders: Vec<Uuid> = reserving.iter().map(|(_, id, _)| *id).collect();
            let mut stock = lock_stock(ctx.db(), &skus, &orders).await?;
            for (envelope, order_id, wanted) in &reserving {
                let outcome = stock.reserve(*order_id, wanted, &mut rows);
                ctx.emit(envelope, outcome);
            }
        }
        apply(ctx.db(), &rows, &committed).await?;
        Ok(left)
    }
}

/// The order a message is about; a restock is about none.
fn order_id(message: &InventoryMessage) -> Option<Uuid> {
    match message {
        InventoryMessage::Reserve(cmd) => Some(cmd.order_id),
        InventoryMessage::Release(cmd) => Some(cmd.order_id),
        InventoryMessage::Commit(cmd) => Some(cmd.order_id),
        InventoryMessage::Restock(_) => None,
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
    let mut stock = lock_stock(ctx.db(), &skus, &[cmd.order_id]).await?;
    let mut reserving = Vec::new();
    let outcome = stock.reserve(cmd.order_id, &wanted, &mut reserving);
    apply(ctx.db(), &reserving, &[]).await?;
    ctx.emit(outcome);
    Ok(())
}

/// The stock rows of a chunk, locked, and which of its orders hold a
/// reservation already.
struct LockedStock {
    available: HashMap<String, i64>,
    held: HashSet<Uuid>,
}

/// Locks the rows of `skus` in SKU order (the lock order of every stock
/// writer, so concurrent chunks wait for each other instead of deadlocking,
/// and two orders never both take the last unit) and reads what they have,
/// and which of `orders` hold a reservation already, in one statement.
async fn lock_stock(
    db: &mut PgConnection,
    skus: &[String],
    orders: &[Uuid],
) -> Result<LockedStock, Failure> {
    let (skus, available, held): (Vec<String>, Vec<i64>, Vec<Uuid>) = sqlx::query_as(
        "WITH locked AS MATERIALIZED (SELECT sku, available FROM inventory.stock \
         WHERE sku = ANY($1) ORDER BY sku FOR UPDATE) \
         SELECT ARRAY(SELECT sku FROM locked), ARRAY(SELECT available FROM locked), \
         ARRAY(SELECT DISTINCT order_id FROM inventory.reservations WHERE order_id = ANY($2))",
    )
    .bind(skus)
    .bind(orders)
    .fetch_one(db)
    .await?;
    Ok(LockedStock {
        available: skus.into_iter().zip(available).collect(),
        held: held.into_iter().collect(),
    })
}

impl LockedStock {
    /// Decides one order, all items or none, against what is left after
    /// the orders decided before it; adds its reservation rows to
    /// `reserving` and returns the event that answers it. An order holding
    /// a reservation already (a replay with a new message id) is answered
    /// `StockReserved` again, unchanged.
    fn reserve(
        &mut self,
        order_id: Uuid,
        wanted: &BTreeMap<String, i64>,
        reserving: &mut Vec<(Uuid, String, i64)>,
    ) -> Outgoing {
        if !self.held.contains(&order_id) {
            let short: Vec<String> = wanted
                .iter()
                .filter(|(sku, q)| self.available.get(*sku).is_none_or(|a| a < *q))
                .map(|(sku, _)| sku.clone())
                .collect();
            if !short.is_empty() {
                info!(%order_id, skus = ?short, "Out of stock");
                return Outgoing::of(&OutOfStock {
                    order_id,
                    skus: short,
                })
                .correlated(order_id);
            }
            for (sku, q) in wanted {
                if let Some(available) = self.available.get_mut(sku) {
                    *available -= q;
                }
                reserving.push((order_id, sku.clone(), *q));
            }
            self.held.insert(order_id);
            info!(%order_id, skus = wanted.len(), "Stock reserved");
        }
        Outgoing::of(&StockReserved { order_id }).correlated(order_id)
    }
}

/// Writes reservations and commits the reservations of `committing`, in
/// one statement: the stock rows change once per SKU by the sum of both.
/// Rows not locked yet are taken in SKU order before any changes (the
/// update needs its row out of `locked`, which yields in order).
async fn apply(
    db: &mut PgConnection,
    reserving: &[(Uuid, String, i64)],
    committing: &[Uuid],
) -> Result<(), Failure> {
    if reserving.is_empty() && committing.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH kept AS (INSERT INTO inventory.reservations (order_id, sku, quantity) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int8[])), \
         done AS (UPDATE inventory.reservations SET committed = true \
         WHERE order_id = ANY($4) AND NOT committed RETURNING sku, quantity), \
         delta AS (SELECT sku, sum(available)::int8 AS available, sum(reserved)::int8 AS reserved, \
         sum(sold)::int8 AS sold FROM (SELECT sku, -q AS available, q AS reserved, 0::int8 AS sold \
         FROM UNNEST($2::text[], $3::int8[]) AS r(sku, q) \
         UNION ALL SELECT sku, 0, -quantity, quantity FROM done) d GROUP BY sku), \
         locked AS (SELECT sku FROM inventory.stock WHERE sku IN (SELECT sku FROM delta) ORDER BY sku FOR UPDATE) \
         UPDATE inventory.stock s SET available = s.available + d.available, \
         reserved = s.reserved + d.reserved, sold = s.sold + d.sold \
         FROM delta d, locked l WHERE s.sku = d.sku AND l.sku = d.sku",
    )
    .bind(reserving.iter().map(|(o, _, _)| *o).collect::<Vec<_>>())
    .bind(reserving.iter().map(|(_, s, _)| s.as_str()).collect::<Vec<_>>())
    .bind(reserving.iter().map(|(_, _, q)| *q).collect::<Vec<_>>())
    .bind(committing)
    .execute(db)
    .await?;
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
    apply(ctx.db(), &[], &[cmd.order_id]).await
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
