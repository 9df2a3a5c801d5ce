//! The message-type registry: every payload type with its exchange and its
//! `type` (which is also its routing key), in one table; the routing-key
//! constants (`keys`) are made from it. [`Message`] is
//! implemented from this table and nowhere else, and `dlq` lists the
//! known types from it.

use crate::bindings::consumers;
use crate::message::Message;
use crate::names::{COMMANDS, Domain, EVENTS};
use crate::payloads::*;

/// One registered message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageType {
    /// The Rust payload type's name, for messages to people.
    pub name: &'static str,
    /// The AMQP `type` and routing key.
    pub kind: &'static str,
    pub exchange: &'static str,
}

impl MessageType {
    /// The domains whose work queues receive this type.
    pub fn consumers(&self) -> Vec<Domain> {
        consumers(self.exchange, self.kind)
    }
}

macro_rules! registry {
    ($( $ty:ident: $exchange:ident, $key:ident = $kind:literal; )+) => {
        /// Routing keys, `<domain>.<verb>`: each message type's `type`.
        pub mod keys {
            $( pub const $key: &str = $kind; )+
        }

        $(
            impl Message for $ty {
                const KIND: &'static str = keys::$key;
                const EXCHANGE: &'static str = $exchange;
            }
        )+

        /// Every message type of the contract.
        pub const MESSAGE_TYPES: &[MessageType] = &[
            $( MessageType { name: stringify!($ty), kind: keys::$key, exchange: $exchange }, )+
        ];
    };
}

registry! {
    // Commands: "do this".
    PlaceOrder: COMMANDS, ORDER_PLACE = "order.place";
    CancelOrder: COMMANDS, ORDER_CANCEL = "order.cancel";
    PaymentTimeout: COMMANDS, ORDER_PAYMENT_TIMEOUT = "order.payment-timeout";
    SetPrice: COMMANDS, ORDER_SET_PRICE = "order.set-price";
    ReserveStock: COMMANDS, INVENTORY_RESERVE = "inventory.reserve";
    ReleaseStock: COMMANDS, INVENTORY_RELEASE = "inventory.release";
    CommitStock: COMMANDS, INVENTORY_COMMIT = "inventory.commit";
    Restock: COMMANDS, INVENTORY_RESTOCK = "inventory.restock";
    ChargePayment: COMMANDS, PAYMENT_CHARGE = "payment.charge";
    RefundPayment: COMMANDS, PAYMENT_REFUND = "payment.refund";
    // Events: "this happened".
    StockReserved: EVENTS, INVENTORY_RESERVED = "inventory.reserved";
    OutOfStock: EVENTS, INVENTORY_OUT_OF_STOCK = "inventory.out-of-stock";
    StockReleased: EVENTS, INVENTORY_RELEASED = "inventory.released";
    PaymentCharged: EVENTS, PAYMENT_CHARGED = "payment.charged";
    PaymentDeclined: EVENTS, PAYMENT_DECLINED = "payment.declined";
    PaymentRefunded: EVENTS, PAYMENT_REFUNDED = "payment.refunded";
    OrderConfirmed: EVENTS, ORDER_CONFIRMED = "order.confirmed";
    OrderCancelled: EVENTS, ORDER_CANCELLED = "order.cancelled";
}

/// The registered type named `kind`.
pub fn find(kind: &str) -> Option<&'static MessageType> {
    MESSAGE_TYPES.iter().find(|t| t.kind == kind)
}

/// Checks a domain's decoder (the `KINDS` of an [`inbound!`](crate::inbound)
/// set) against the registry and the bindings: it must read every type
/// routed to the domain's queue, and only those.
pub fn check_decoder(domain: Domain, kinds: &[&str]) -> Result<(), String> {
    let mut gaps = Vec::new();
    for t in MESSAGE_TYPES {
        if t.consumers().contains(&domain) && !kinds.contains(&t.kind) {
            gaps.push(format!(
                "{} ({}) is routed to the {domain} queue but has no variant",
                t.kind, t.name
            ));
        }
    }
    for kind in kinds {
        match find(kind) {
            None => gaps.push(format!("{kind} is not a registered message type")),
            Some(t) if !t.consumers().contains(&domain) => gaps.push(format!(
                "{kind} is decoded but never routed to the {domain} queue"
            )),
            Some(_) => {}
        }
        if kinds.iter().filter(|k| *k == kind).count() > 1 {
            gaps.push(format!("{kind} has more than one variant"));
        }
    }
    if gaps.is_empty() {
        Ok(())
    } else {
        Err(gaps.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_type_has_one_name_and_reaches_a_consumer() {
        for t in MESSAGE_TYPES {
            assert_eq!(
                MESSAGE_TYPES.iter().filter(|o| o.kind == t.kind).count(),
                1,
                "{} is registered twice",
                t.kind
            );
            assert!(
                !t.consumers().is_empty(),
                "{} ({}) reaches no queue",
                t.kind,
                t.name
            );
        }
    }

    #[test]
    fn each_message_routes_by_its_kind_on_its_exchange() {
        assert_eq!(ReserveStock::EXCHANGE, "commands");
        assert_eq!(ReserveStock::KIND, "inventory.reserve");
        assert_eq!(OutOfStock::EXCHANGE, "events");
        assert_eq!(OutOfStock::KIND, "inventory.out-of-stock");
        assert_eq!(find("order.place").map(|t| t.name), Some("PlaceOrder"));
    }

    #[test]
    fn a_decoder_missing_a_routed_type_is_caught() {
        let all = [
            keys::INVENTORY_RESERVE,
            keys::INVENTORY_RELEASE,
            keys::INVENTORY_COMMIT,
            keys::INVENTORY_RESTOCK,
        ];
        assert_eq!(check_decoder(Domain::Inventory, &all), Ok(()));
        let missing = check_decoder(Domain::Inventory, &all[..3]).expect_err("missing");
        assert!(missing.contains("inventory.restock"), "{missing}");
        let foreign = check_decoder(
            Domain::Notification,
            &[
                keys::ORDER_CONFIRMED,
                keys::ORDER_CANCELLED,
                keys::PAYMENT_CHARGE,
            ],
        )
        .expect_err("foreign");
        assert!(foreign.contains("never routed"), "{foreign}");
        let unknown = check_decoder(Domain::Order, &["order.nonsense"]).expect_err("unknown");
        assert!(unknown.contains("not a registered"), "{unknown}");
    }
}
