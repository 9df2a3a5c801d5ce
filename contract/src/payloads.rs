//! The payloads that travel between orderflow's binaries, one struct per
//! message type. The AMQP `type` (and routing key) names the type; version 1
//! of each payload is the struct as it stands. A change that old consumers
//! could not read gets a new type name (`order.place.v2`), so that both can
//! be in flight during a rolling deploy; fields may only be added with a
//! default.
//!
//! Each type's `type`, routing key and exchange are in the registry
//! (`registry.rs`).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Payment method token used when an order names none.
pub const DEFAULT_PAYMENT_METHOD: &str = "pm_card_visa";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: u64,
}

/// A line as the client ordered it: the unit price it expects, if it gave
/// one. The amount charged is always the catalog's; a line whose expected
/// price differs from it cancels the order (`price_changed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderedLine {
    pub sku: String,
    pub quantity: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price_cents: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: u32,
}

// ---- commands -----------------------------------------------------------

/// Place an order (from the publisher).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceOrder {
    pub order_id: Uuid,
    pub customer_email: String,
    pub currency: String,
    pub items: Vec<OrderedLine>,
    pub payment_method: String,
    /// The customer who placed it (a JWT's `sub`), who alone may read and
    /// cancel it; absent for orders placed with an API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placed_by: Option<String>,
}

/// Set the catalog price of a product (from the publisher): what an order
/// placed after it is charged for the SKU, in `currency`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPrice {
    pub sku: String,
    pub unit_price_cents: u64,
    pub currency: String,
}

/// Cancel an order at whatever stage it is (from the publisher).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOrder {
    pub order_id: Uuid,
}

/// The payment of an order did not answer in time (scheduled by the saga).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentTimeout {
    pub order_id: Uuid,
}

/// Reserve every item of an order, or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveStock {
    pub order_id: Uuid,
    pub items: Vec<Item>,
}

/// Give back whatever an order holds, reserved or sold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseStock {
    pub order_id: Uuid,
}

/// Turn an order's reservation into a sale (the order is confirmed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStock {
    pub order_id: Uuid,
    /// The order's SKUs, sorted: only a hint for the order in which the
    /// inventory worker takes stock rows (the reservation rows are the
    /// truth). Absent in older messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skus: Vec<String>,
}

/// Add stock to a SKU (from the publisher).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restock {
    pub sku: String,
    pub quantity: u32,
}

/// Charge an order's total.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargePayment {
    pub order_id: Uuid,
    pub amount_cents: u64,
    pub currency: String,
    pub payment_method: String,
}

/// Make sure no charge of an order stands: refund it, or void it before it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundPayment {
    pub order_id: Uuid,
}

// ---- events -------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReserved {
    pub order_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutOfStock {
    pub order_id: Uuid,
    /// The SKUs that lacked stock.
    pub skus: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReleased {
    pub order_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCharged {
    pub order_id: Uuid,
    pub charge_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentDeclined {
    pub order_id: Uuid,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    pub order_id: Uuid,
    /// The charges refunded; empty when the payment was voided before any charge.
    pub charge_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: Uuid,
    pub customer_email: String,
    pub currency: String,
    pub total_cents: u64,
    pub items: Vec<Line>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: Uuid,
    pub customer_email: String,
    pub currency: String,
    pub total_cents: u64,
    pub reason: String,
    /// Whether a charge was refunded.
    pub refunded: bool,
}
