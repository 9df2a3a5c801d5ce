//! The order state machine, as a pure function: what the saga does when it
//! hears `event` about an order in `status`. The handlers in `lib.rs` read
//! and lock the order, ask [`decide`], and carry the decision out (or, for
//! the two common steps, apply it in one statement whose shape a test here
//! holds to this table).
//!
//! ```text
//! PENDING ──stock reserved──▶ STOCK_RESERVED ──charged──▶ PAID ──▶ CONFIRMED
//!    │                             │
//!    └──out of stock / cancel──▶ CANCELLED ◀──declined / timeout / cancel──┘
//! PAID / CONFIRMED ──cancel──▶ CANCELLED (refunded)
//! ```

/// Order statuses of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Pending,
    StockReserved,
    Paid,
    Confirmed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Pending,
        Status::StockReserved,
        Status::Paid,
        Status::Confirmed,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::StockReserved => "STOCK_RESERVED",
            Status::Paid => "PAID",
            Status::Confirmed => "CONFIRMED",
            Status::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

/// Why an order was cancelled (`reason` in the API).
pub mod reason {
    pub const OUT_OF_STOCK: &str = "out_of_stock";
    pub const PAYMENT_DECLINED: &str = "payment_declined";
    pub const CUSTOMER_CANCELLED: &str = "customer_cancelled";
    pub const PAYMENT_TIMEOUT: &str = "payment_timeout";
    /// A line's SKU is not in the catalog in the order's currency.
    pub const UNKNOWN_PRODUCT: &str = "unknown_product";
    /// A line's expected price is not the catalog's.
    pub const PRICE_CHANGED: &str = "price_changed";
}

/// What the saga hears about an order after placing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    StockReserved,
    OutOfStock,
    PaymentCharged,
    PaymentDeclined,
    PaymentTimedOut,
    CancelRequested,
}

impl Event {
    pub const ALL: [Event; 6] = [
        Event::StockReserved,
        Event::OutOfStock,
        Event::PaymentCharged,
        Event::PaymentDeclined,
        Event::PaymentTimedOut,
        Event::CancelRequested,
    ];
}

/// What the saga sends in answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Charge the order's total; its payment deadline starts.
    ChargePayment,
    /// Commit the stock and announce the confirmation (`order.confirmed`).
    Confirm,
    /// Give back whatever stock the order holds (also a reservation still
    /// on its way).
    ReleaseStock,
    /// Make sure no charge stands: refund it, or void it before it lands.
    RefundPayment,
    /// Announce the cancellation (`order.cancelled`).
    AnnounceCancelled { refunded: bool },
}

/// A decision: the statuses the order goes through (none: it stays), the
/// reason recorded with them, and the commands sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub steps: &'static [Status],
    pub reason: Option<&'static str>,
    pub commands: Vec<Command>,
}

impl Decision {
    fn stay(commands: Vec<Command>) -> Self {
        Self {
            steps: &[],
            reason: None,
            commands,
        }
    }

    fn advance(steps: &'static [Status], commands: Vec<Command>) -> Self {
        Self {
            steps,
            reason: None,
            commands,
        }
    }

    fn cancel(reason: &'static str, commands: Vec<Command>) -> Self {
        Self {
            steps: &[Status::Cancelled],
            reason: Some(reason),
            commands,
        }
    }

    /// The status the order ends in, if it changes.
    pub fn to(&self) -> Option<Status> {
        self.steps.last().copied()
    }
}

/// What the saga does when it hears `event` about an order in `status`.
/// Events that no longer fit (a payment result after a cancellation) get
/// the compensation they call for, or nothing: never an error.
pub fn decide(status: Status, event: Event) -> Decision {
    use Command::*;
    use Status::*;
    match (event, status) {
        (Event::StockReserved, Pending) => Decision::advance(&[StockReserved], vec![ChargePayment]),
        // Cancelled while the reservation was on its way: give it back.
        (Event::StockReserved, Cancelled) => Decision::stay(vec![ReleaseStock]),
        (Event::StockReserved, _) => Decision::stay(vec![]),

        (Event::OutOfStock, Pending) => Decision::cancel(
            reason::OUT_OF_STOCK,
            vec![AnnounceCancelled { refunded: false }],
        ),
        (Event::OutOfStock, _) => Decision::stay(vec![]),

        (Event::PaymentCharged, StockReserved) => {
            Decision::advance(&[Paid, Confirmed], vec![Confirm])
        }
        // A charge that landed after the order was given up: refund it.
        (Event::PaymentCharged, Cancelled) => Decision::stay(vec![RefundPayment]),
        (Event::PaymentCharged, _) => Decision::stay(vec![]),

        // Declined: nothing was charged, nothing to void.
        (Event::PaymentDeclined, StockReserved) => Decision::cancel(
            reason::PAYMENT_DECLINED,
            vec![ReleaseStock, AnnounceCancelled { refunded: false }],
        ),
        (Event::PaymentDeclined, _) => Decision::stay(vec![]),

        // The charge may still land: void it (or refund it when it does).
        (Event::PaymentTimedOut, StockReserved) => Decision::cancel(
            reason::PAYMENT_TIMEOUT,
            vec![
                ReleaseStock,
                RefundPayment,
                AnnounceCancelled { refunded: false },
            ],
        ),
        (Event::PaymentTimedOut, _) => Decision::stay(vec![]),

        (Event::CancelRequested, Cancelled) => Decision::stay(vec![]),
        // Also when PENDING: a reservation may be on its way.
        (Event::CancelRequested, Pending) => Decision::cancel(
            reason::CUSTOMER_CANCELLED,
            vec![ReleaseStock, AnnounceCancelled { refunded: false }],
        ),
        (Event::CancelRequested, StockReserved) => Decision::cancel(
            reason::CUSTOMER_CANCELLED,
            vec![
                RefundPayment,
                ReleaseStock,
                AnnounceCancelled { refunded: false },
            ],
        ),
        (Event::CancelRequested, Paid | Confirmed) => Decision::cancel(
            reason::CUSTOMER_CANCELLED,
            vec![
                RefundPayment,
                ReleaseStock,
                AnnounceCancelled { refunded: true },
            ],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_decision() -> impl Iterator<Item = (Status, Event, Decision)> {
        Status::ALL.into_iter().flat_map(|status| {
            Event::ALL
                .into_iter()
                .map(move |event| (status, event, decide(status, event)))
        })
    }

    /// How far along the happy path a status is.
    fn rank(status: Status) -> u8 {
        match status {
            Status::Pending => 0,
            Status::StockReserved => 1,
            Status::Paid => 2,
            Status::Confirmed => 3,
            Status::Cancelled => 4,
        }
    }

    #[test]
    fn the_happy_path_reserves_charges_and_confirms() {
        let reserved = decide(Status::Pending, Event::StockReserved);
        assert_eq!(reserved.to(), Some(Status::StockReserved));
        assert_eq!(reserved.commands, vec![Command::ChargePayment]);
        let charged = decide(Status::StockReserved, Event::PaymentCharged);
        assert_eq!(charged.steps, &[Status::Paid, Status::Confirmed]);
        assert_eq!(charged.commands, vec![Command::Confirm]);
    }

    #[test]
    fn an_order_never_goes_back_and_a_cancelled_one_never_moves() {
        for (status, event, decision) in every_decision() {
            let mut at = status;
            for &step in decision.steps {
                assert!(
                    rank(step) > rank(at),
                    "{status:?} + {event:?} goes back to {step:?}"
                );
                at = step;
            }
            if status == Status::Cancelled {
                assert_eq!(decision.to(), None, "{event:?} moved a cancelled order");
            }
        }
    }

    #[test]
    fn every_cancellation_is_announced_once_with_its_reason_and_gives_the_stock_back() {
        for (status, event, decision) in every_decision() {
            let announcements = decision
                .commands
                .iter()
                .filter(|c| matches!(c, Command::AnnounceCancelled { .. }))
                .count();
            if decision.to() == Some(Status::Cancelled) {
                assert_eq!(announcements, 1, "{status:?} + {event:?}");
                assert!(decision.reason.is_some(), "{status:?} + {event:?}");
                // Out of stock: nothing was reserved.
                if event != Event::OutOfStock {
                    assert!(
                        decision.commands.contains(&Command::ReleaseStock),
                        "{status:?} + {event:?} keeps the stock"
                    );
                }
            } else {
                assert_eq!(announcements, 0, "{status:?} + {event:?}");
            }
        }
    }

    #[test]
    fn no_charge_can_stand_on_a_cancelled_order() {
        for (status, event, decision) in every_decision() {
            let refunds = decision.commands.contains(&Command::RefundPayment);
            // A charge may exist or be on its way once the payment was asked
            // for (STOCK_RESERVED onwards), unless the gateway declined it.
            let may_be_charged = matches!(
                status,
                Status::StockReserved | Status::Paid | Status::Confirmed
            ) && event != Event::PaymentDeclined;
            if decision.to() == Some(Status::Cancelled) && may_be_charged {
                assert!(refunds, "{status:?} + {event:?} cancels without a refund");
            }
            if status == Status::Cancelled && event == Event::PaymentCharged {
                assert!(refunds, "a late charge on a cancelled order stands");
            }
        }
    }

    #[test]
    fn the_customer_is_told_a_refund_only_when_a_charge_was_confirmed() {
        for status in [Status::Paid, Status::Confirmed] {
            let decision = decide(status, Event::CancelRequested);
            assert!(
                decision
                    .commands
                    .contains(&Command::AnnounceCancelled { refunded: true })
            );
        }
        let decision = decide(Status::StockReserved, Event::CancelRequested);
        assert!(
            decision
                .commands
                .contains(&Command::AnnounceCancelled { refunded: false })
        );
    }

    #[test]
    fn only_a_confirmation_commits_stock_and_only_a_reservation_charges() {
        for (status, event, decision) in every_decision() {
            if decision.commands.contains(&Command::Confirm) {
                assert_eq!(
                    (status, event),
                    (Status::StockReserved, Event::PaymentCharged)
                );
            }
            if decision.commands.contains(&Command::ChargePayment) {
                assert_eq!((status, event), (Status::Pending, Event::StockReserved));
            }
        }
    }

    #[test]
    fn repeated_events_change_nothing_the_second_time() {
        for status in Status::ALL {
            for event in Event::ALL {
                let first = decide(status, event);
                let Some(to) = first.to() else { continue };
                let again = decide(to, event);
                assert_eq!(again.to(), None, "{status:?} + {event:?} twice");
                assert!(
                    !again.commands.iter().any(|c| matches!(
                        c,
                        Command::ChargePayment
                            | Command::Confirm
                            | Command::AnnounceCancelled { .. }
                    )),
                    "{status:?} + {event:?} twice sends {:?}",
                    again.commands
                );
            }
        }
    }

    #[test]
    fn statuses_read_back_as_written() {
        for status in Status::ALL {
            assert_eq!(Status::parse(status.as_str()), Some(status));
        }
        assert_eq!(Status::parse("SHIPPED"), None);
    }
}
