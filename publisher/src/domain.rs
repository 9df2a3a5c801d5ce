//! Parse, don't validate: a request body becomes a [`NewOrder`] made of
//! types that cannot hold invalid data, or a list of every field that is wrong.

use serde::{Deserialize, Serialize};

/// One field that is wrong and why, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

pub const MAX_ITEMS: usize = 100;
pub const MAX_QUANTITY: i64 = 10_000;
pub const MAX_UNIT_PRICE_CENTS: i64 = 100_000_000;
pub const MAX_RESTOCK: i64 = 1_000_000;

/// Currencies the shop accepts (ISO 4217).
pub const CURRENCIES: &[&str] = &[
    "AUD", "CAD", "CHF", "CZK", "DKK", "EUR", "GBP", "HUF", "JPY", "NOK", "NZD", "PLN", "SEK",
    "USD",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerEmail(String);

impl CustomerEmail {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let s = raw.trim();
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > 254 {
            return Err("must be at most 254 characters".into());
        }
        if s.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"' | ',' | ';')
        }) {
            return Err("must be a plain address such as name@example.com".into());
        }
        let Some((local, domain)) = s.split_once('@') else {
            return Err("must contain @".into());
        };
        let labels_ok = domain.split('.').count() >= 2 && domain.split('.').all(|l| !l.is_empty());
        if local.is_empty() || local.len() > 64 || domain.contains('@') || !labels_ok {
            return Err("must be an address such as name@example.com".into());
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Currency(&'static str);

impl Currency {
    pub fn parse(raw: &str) -> Result<Self, String> {
        CURRENCIES
            .iter()
            .find(|c| **c == raw)
            .map(|c| Self(c))
            .ok_or_else(|| {
                format!(
                    "unknown currency {raw:?}; accepted: {}",
                    CURRENCIES.join(", ")
                )
            })
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sku(String);

impl Sku {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() || raw.len() > 64 {
            return Err("must be 1 to 64 characters".into());
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err("may hold only letters, digits, '-', '_' and '.'".into());
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentMethod(String);

impl PaymentMethod {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let ok = raw.starts_with("pm_")
            && (4..=64).contains(&raw.len())
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err("must be a payment method token such as pm_card_visa".into())
        }
    }
}

fn bounded(value: i64, min: i64, max: i64) -> Result<u32, String> {
    if value < min || value > max {
        return Err(format!("must be between {min} and {max}"));
    }
    u32::try_from(value).map_err(|_| format!("must be between {min} and {max}"))
}

/// The body of `POST /orders` as sent. Numbers are wide so that a negative
/// or huge value is reported on its field rather than as a type error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    pub customer_email: String,
    pub currency: String,
    pub items: Vec<ItemRequest>,
    pub payment_method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    pub sku: String,
    pub quantity: i64,
    /// What the client expects to pay per unit; the catalog's price is
    /// charged, and an order whose expected price differs is refused.
    #[serde(default)]
    pub unit_price_cents: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub customer_email: CustomerEmail,
    pub currency: Currency,
    pub items: Vec<contract::OrderedLine>,
    pub payment_method: String,
}

impl NewOrder {
    pub fn parse(req: OrderRequest) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let email = CustomerEmail::parse(&req.customer_email)
            .map_err(|m| errors.push(field_error("customer_email", m)))
            .ok();
        let currency = Currency::parse(&req.currency)
            .map_err(|m| errors.push(field_error("currency", m)))
            .ok();
        if req.items.is_empty() {
            errors.push(field_error("items", "must hold at least one item"));
        }
        if req.items.len() > MAX_ITEMS {
            errors.push(field_error(
                "items",
                format!("must hold at most {MAX_ITEMS} items"),
            ));
        }
        let mut items = Vec::with_capacity(req.items.len());
        for (i, item) in req.items.iter().enumerate() {
            let sku = Sku::parse(&item.sku)
                .map_err(|m| errors.push(field_error(format!("items[{i}].sku"), m)));
            let quantity = bounded(item.quantity, 1, MAX_QUANTITY)
                .map_err(|m| errors.push(field_error(format!("items[{i}].quantity"), m)));
            let price = item
                .unit_price_cents
                .map(|p| bounded(p, 0, MAX_UNIT_PRICE_CENTS))
                .transpose()
                .map_err(|m| errors.push(field_error(format!("items[{i}].unit_price_cents"), m)));
            if let (Ok(sku), Ok(quantity), Ok(price)) = (sku, quantity, price) {
                items.push(contract::OrderedLine {
                    sku: sku.0,
                    quantity,
                    unit_price_cents: price.map(u64::from),
                });
            }
        }
        let method = req
            .payment_method
            .as_deref()
            .unwrap_or(contract::DEFAULT_PAYMENT_METHOD);
        let payment_method = PaymentMethod::parse(method)
            .map_err(|m| errors.push(field_error("payment_method", m)))
            .ok();
        match (email, currency, payment_method) {
            (Some(customer_email), Some(currency), Some(PaymentMethod(payment_method)))
                if errors.is_empty() =>
            {
                Ok(Self {
                    customer_email,
                    currency,
                    items,
                    payment_method,
                })
            }
            _ => Err(errors),
        }
    }
}

/// The body of `PUT /products/{sku}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceRequest {
    pub unit_price_cents: i64,
    pub currency: String,
}

/// A product's price, checked.
pub fn price(req: &PriceRequest) -> Result<(u64, Currency), Vec<FieldError>> {
    let mut errors = Vec::new();
    let cents = bounded(req.unit_price_cents, 0, MAX_UNIT_PRICE_CENTS)
        .map_err(|m| errors.push(field_error("unit_price_cents", m)));
    let currency =
        Currency::parse(&req.currency).map_err(|m| errors.push(field_error("currency", m)));
    match (cents, currency) {
        (Ok(cents), Ok(currency)) => Ok((u64::from(cents), currency)),
        _ => Err(errors),
    }
}

/// The body of `POST /inventory/{sku}/restock`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestockRequest {
    pub quantity: i64,
}

pub fn restock_quantity(req: &RestockRequest) -> Result<u32, Vec<FieldError>> {
    bounded(req.quantity, 1, MAX_RESTOCK).map_err(|m| vec![field_error("quantity", m)])
}

/// `Idempotency-Key`: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() || raw.len() > 255 || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("Idempotency-Key must be 1 to 255 visible ASCII characters".into());
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> OrderRequest {
        serde_json::from_value(json).expect("shape")
    }

    #[test]
    fn a_good_order_parses() {
        let order = NewOrder::parse(request(serde_json::json!({
            "customer_email": "ada@example.com", "currency": "EUR",
            "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1999}]
        })))
        .expect("valid");
        assert_eq!(order.payment_method, "pm_card_visa");
        assert_eq!(order.items[0].quantity, 2);
    }

    #[test]
    fn every_bad_field_is_named() {
        let errors = NewOrder::parse(request(serde_json::json!({
            "customer_email": "not an email", "currency": "XXX",
            "items": [{"sku": "", "quantity": -1, "unit_price_cents": 1_000_000_000_000i64}],
            "payment_method": "visa"
        })))
        .expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "customer_email",
                "currency",
                "items[0].sku",
                "items[0].quantity",
                "items[0].unit_price_cents",
                "payment_method"
            ]
        );
    }

    #[test]
    fn emails_are_checked() {
        for good in ["a@b.co", "first.last+tag@sub.example.org"] {
            assert!(CustomerEmail::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a",
            "a@b",
            "@b.co",
            "a@@b.co",
            "a b@c.de",
            "a@b..c",
            "<a@b.co>",
            "a@b.co,c@d.ee",
        ] {
            assert!(CustomerEmail::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_bounded() {
        assert!(IdempotencyKey::parse("k-1").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("with space").is_err());
        assert!(IdempotencyKey::parse(&"x".repeat(256)).is_err());
    }
}
