//! What an order costs. The catalog (`orders.products`, set by
//! `order.set-price`) prices every line when the saga places the order; a
//! price the client gave is only what it expects to pay: one that differs
//! from the catalog's cancels the order (`price_changed`), as does a SKU
//! the catalog does not sell in the order's currency (`unknown_product`).
//! `PRICES=client` trusts the client's prices instead (the old behaviour),
//! pricing from the catalog only the lines that name none.

use crate::saga::reason;
use contract::{PlaceOrder, SetPrice};
use runtime::Failure;
use runtime::config::Var;
use sqlx::PgConnection;
use std::collections::HashMap;
use tracing::info;

/// `PRICES`: `catalog` (the default) or `client`.
pub const PRICES: Var = Var::new("PRICES", "catalog");

/// Whose prices an order is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pricing {
    /// The catalog's, always; a client's differing price cancels the order.
    Catalog,
    /// The client's where it gave one (trusted: for a publisher behind a
    /// system that priced the order itself), else the catalog's.
    Client,
}

impl Pricing {
    pub fn parse(raw: &str) -> Result<Self, String> {
        match raw {
            "catalog" => Ok(Self::Catalog),
            "client" => Ok(Self::Client),
            _ => Err("expected catalog or client".to_owned()),
        }
    }
}

/// The catalog rows of some SKUs.
#[derive(Debug, Default)]
pub struct Catalog(HashMap<String, (i64, String)>);

impl Catalog {
    /// The prices of `skus`, in one statement.
    pub async fn load(db: &mut PgConnection, skus: &[&str]) -> Result<Self, Failure> {
        if skus.is_empty() {
            return Ok(Self::default());
        }
        let rows: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT sku, unit_price_cents, currency FROM orders.products WHERE sku = ANY($1)",
        )
        .bind(skus)
        .fetch_all(db)
        .await?;
        Ok(Self(
            rows.into_iter()
                .map(|(sku, price, currency)| (sku, (price, currency)))
                .collect(),
        ))
    }

    /// The unit price of `sku` in `currency`, if the catalog sells it so.
    fn price(&self, sku: &str, currency: &str) -> Option<i64> {
        self.0
            .get(sku)
            .filter(|(_, c)| c == currency)
            .map(|(p, _)| *p)
    }
}

/// An order priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    /// Each line's unit price, where known.
    pub prices: Vec<Option<i64>>,
    /// What is charged: the lines' sum, or 0 for a refused order.
    pub total_cents: i64,
    /// Why the order cannot be placed (a reason of the contract), with
    /// the lines that make it so.
    pub refused: Option<(&'static str, String)>,
}

/// Prices `cmd` from `catalog`; `Err` for an order no price can help (no
/// items, a total that overflows).
pub fn price(cmd: &PlaceOrder, catalog: &Catalog, pricing: Pricing) -> Result<Priced, Failure> {
    if cmd.items.is_empty() || cmd.customer_email.is_empty() {
        return Err(Failure::permanent(
            "an order needs a customer email and items",
        ));
    }
    let mut prices = Vec::with_capacity(cmd.items.len());
    let mut unknown = Vec::new();
    let mut changed = Vec::new();
    for line in &cmd.items {
        let listed = catalog.price(&line.sku, &cmd.currency);
        let given = line
            .unit_price_cents
            .map(|p| i64::try_from(p).unwrap_or(i64::MAX));
        let price = match (pricing, listed, given) {
            (Pricing::Client, _, Some(given)) => Some(given),
            (_, None, _) => {
                unknown.push(line.sku.as_str());
                None
            }
            (Pricing::Catalog, Some(listed), Some(given)) if given != listed => {
                changed.push(format!("{} costs {listed}, not {given}", line.sku));
                Some(listed)
            }
            (_, Some(listed), _) => Some(listed),
        };
        prices.push(price);
    }
    let refused = if !unknown.is_empty() {
        Some((
            reason::UNKNOWN_PRODUCT,
            format!("not sold in {}: {}", cmd.currency, unknown.join(", ")),
        ))
    } else if !changed.is_empty() {
        Some((reason::PRICE_CHANGED, changed.join("; ")))
    } else {
        None
    };
    let total_cents = if refused.is_some() {
        0
    } else {
        cmd.items
            .iter()
            .zip(&prices)
            .try_fold(0i64, |acc, (line, price)| {
                price
                    .unwrap_or_default()
                    .checked_mul(i64::from(line.quantity))
                    .and_then(|sum| acc.checked_add(sum))
            })
            .ok_or_else(|| Failure::permanent("order total overflows"))?
    };
    Ok(Priced {
        prices,
        total_cents,
        refused,
    })
}

/// Sets a product's price; an order placed after it is charged so.
pub async fn set_price(db: &mut PgConnection, cmd: &SetPrice) -> Result<(), Failure> {
    let valid_currency =
        cmd.currency.len() == 3 && cmd.currency.chars().all(|c| c.is_ascii_uppercase());
    if cmd.sku.is_empty() || !valid_currency {
        return Err(Failure::permanent(format!(
            "invalid price {:?} in {:?}",
            cmd.sku, cmd.currency
        )));
    }
    let price = i64::try_from(cmd.unit_price_cents)
        .map_err(|_| Failure::permanent("price out of range"))?;
    sqlx::query(
        "INSERT INTO orders.products (sku, unit_price_cents, currency) VALUES ($1, $2, $3) \
         ON CONFLICT (sku) DO UPDATE SET unit_price_cents = EXCLUDED.unit_price_cents, \
         currency = EXCLUDED.currency, updated_at = now()",
    )
    .bind(&cmd.sku)
    .bind(price)
    .bind(&cmd.currency)
    .execute(db)
    .await?;
    info!(sku = %cmd.sku, unit_price_cents = price, currency = %cmd.currency, "Price set");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use contract::OrderedLine;
    use uuid::Uuid;

    fn order(lines: &[(&str, u32, Option<u64>)]) -> PlaceOrder {
        PlaceOrder {
            order_id: Uuid::new_v4(),
            customer_email: "ada@example.com".into(),
            currency: "EUR".into(),
            items: lines
                .iter()
                .map(|(sku, quantity, price)| OrderedLine {
                    sku: (*sku).into(),
                    quantity: *quantity,
                    unit_price_cents: *price,
                })
                .collect(),
            payment_method: "pm_card_visa".into(),
            placed_by: None,
        }
    }

    fn catalog() -> Catalog {
        Catalog(
            [
                ("A".to_owned(), (250, "EUR".to_owned())),
                ("B".to_owned(), (500, "EUR".to_owned())),
                ("USD-ONLY".to_owned(), (100, "USD".to_owned())),
            ]
            .into_iter()
            .collect(),
        )
    }

    #[test]
    fn the_catalog_prices_every_line_whatever_the_client_left_out() {
        let priced = price(
            &order(&[("A", 2, None), ("B", 1, Some(500))]),
            &catalog(),
            Pricing::Catalog,
        )
        .unwrap();
        assert_eq!(priced.prices, vec![Some(250), Some(500)]);
        assert_eq!(priced.total_cents, 1000);
        assert_eq!(priced.refused, None);
    }

    #[test]
    fn a_price_that_differs_or_a_product_not_sold_refuses_the_order() {
        let changed = price(&order(&[("A", 1, Some(1))]), &catalog(), Pricing::Catalog).unwrap();
        assert_eq!(changed.refused.unwrap().0, reason::PRICE_CHANGED);
        assert_eq!(changed.total_cents, 0);
        for sku in ["NOPE", "USD-ONLY"] {
            let unknown = price(
                &order(&[("A", 1, None), (sku, 1, None)]),
                &catalog(),
                Pricing::Catalog,
            )
            .unwrap();
            let (why, detail) = unknown.refused.unwrap();
            assert_eq!(why, reason::UNKNOWN_PRODUCT);
            assert!(detail.contains(sku), "{detail}");
        }
    }

    #[test]
    fn client_pricing_trusts_given_prices_and_falls_back_to_the_catalog() {
        let priced = price(
            &order(&[("A", 1, Some(1)), ("B", 1, None)]),
            &catalog(),
            Pricing::Client,
        )
        .unwrap();
        assert_eq!(priced.total_cents, 501);
        let unknown = price(&order(&[("NOPE", 1, None)]), &catalog(), Pricing::Client).unwrap();
        assert_eq!(unknown.refused.unwrap().0, reason::UNKNOWN_PRODUCT);
    }

    #[test]
    fn an_overflowing_total_or_an_empty_order_is_permanent() {
        let huge = price(
            &order(&[("A", u32::MAX, Some(u64::MAX))]),
            &catalog(),
            Pricing::Client,
        );
        assert!(matches!(huge, Err(Failure::Permanent(_))));
        assert!(price(&order(&[]), &catalog(), Pricing::Catalog).is_err());
    }
}
