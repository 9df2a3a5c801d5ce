//! How a payload type meets the wire: [`Message`] names it for sending,
//! [`Inbound`] reads a consumer's set of types back by `type`, and
//! [`inbound!`](crate::inbound) builds that set from the types alone.

use serde::Serialize;

/// A payload type that can be sent. `KIND` is both the AMQP `type` and the
/// routing key (`inventory.reserve`); `EXCHANGE` is `commands` or `events`.
/// Implemented for every contract payload by the registry (`registry.rs`),
/// and only there.
pub trait Message: Serialize {
    const KIND: &'static str;
    const EXCHANGE: &'static str;
}

/// The set of payloads a consumer accepts, decoded by `type`. A body that
/// does not decode is a malformed message, not a handler failure.
pub trait Inbound: Sized + Send {
    fn decode(kind: &str, body: &[u8]) -> Result<Self, Malformed>;
}

/// Why a delivery cannot be turned into a message; it goes to the dead
/// queue at once with kind `malformed`, since no retry can fix it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Malformed {
    #[error("message_id is missing")]
    MissingMessageId,
    #[error("message_id {0:?} is not a UUID")]
    BadMessageId(String),
    #[error("type is missing")]
    MissingType,
    #[error("content_type is {0:?}, expected application/json")]
    ContentType(Option<String>),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("body of {kind} is not valid: {reason}")]
    Body { kind: String, reason: String },
}

/// Decodes a JSON body into `T`, naming the message type in the error.
pub fn decode_json<T: serde::de::DeserializeOwned>(
    kind: &str,
    body: &[u8],
) -> Result<T, Malformed> {
    serde_json::from_slice(body).map_err(|e| Malformed::Body {
        kind: kind.to_owned(),
        reason: e.to_string(),
    })
}

/// Declares the messages a domain's worker consumes, as an enum with one
/// variant per payload type, and derives from it the decoding by `type`
/// ([`Inbound`]) and the list of types it reads (`KINDS`).
///
/// It also writes a unit test into the crate that calls it: every message
/// type the contract's bindings route to the domain's queue must have a
/// variant, and every variant must be routed there. A worker that forgets
/// a type fails `cargo test`, instead of dead-lettering it in production.
///
/// ```
/// contract::inbound! {
///     /// What the inventory worker consumes.
///     pub enum InventoryMessage for contract::Domain::Inventory {
///         Reserve(contract::ReserveStock),
///         Release(contract::ReleaseStock),
///         Commit(contract::CommitStock),
///         Restock(contract::Restock),
///     }
/// }
/// # use contract::Inbound;
/// let body = br#"{"order_id":"0191e7a4-0000-7000-8000-000000000000"}"#;
/// assert!(matches!(
///     InventoryMessage::decode("inventory.release", body),
///     Ok(InventoryMessage::Release(_))
/// ));
/// ```
#[macro_export]
macro_rules! inbound {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident for $domain:path {
            $( $(#[$variant_meta:meta])* $variant:ident($ty:ty) ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$variant_meta])* $variant($ty), )+
        }

        #[allow(dead_code, reason = "a private set reads these only in its test")]
        impl $name {
            /// The domain whose work queue this set is read from.
            pub const DOMAIN: $crate::Domain = $domain;
            /// Every message type in the set, by `type`.
            pub const KINDS: &'static [&'static str] =
                &[ $( <$ty as $crate::Message>::KIND ),+ ];
        }

        impl $crate::Inbound for $name {
            fn decode(kind: &str, body: &[u8]) -> ::core::result::Result<Self, $crate::Malformed> {
                $(
                    if kind == <$ty as $crate::Message>::KIND {
                        return $crate::decode_json(kind, body).map(Self::$variant);
                    }
                )+
                Err($crate::Malformed::UnknownType(kind.to_owned()))
            }
        }

        #[cfg(test)]
        #[test]
        fn decodes_every_message_type_routed_to_its_queue() {
            $crate::registry::check_decoder($name::DOMAIN, $name::KINDS)
                .unwrap_or_else(|gap| panic!("{}: {gap}", stringify!($name)));
        }
    };
}
