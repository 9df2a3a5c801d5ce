//! Who is calling, and what they may do.
//!
//! Every endpoint but `/healthz` and `/readyz` takes `Authorization: Bearer
//! <token>`, where the token is the secret of one of `API_KEYS`
//! (`name:role:secret`, comma-separated). A missing or unknown token is
//! answered `401` with `WWW-Authenticate: Bearer`; a token whose role does
//! not cover the endpoint, `403`. Secrets are compared in constant time, as
//! SHA-256 digests so that their lengths do not show either, and never
//! logged: the effective configuration names keys and roles only. JWTs
//! (`jwt`) name callers too, with keys from a shared secret or the
//! identity provider's key set (`jwks`).

mod jwks;
pub mod jwt;

use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;
use runtime::config::{ConfigError, Source, Var};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::Arc;
use subtle::ConstantTimeEq;

use jwt::{JwtSettings, JwtVerifier};

const API_KEYS: Var = Var::optional("API_KEYS");
/// `off` serves every endpoint without authentication (local development).
const AUTH: Var = Var::new("AUTH", "on");

/// The shortest secret accepted: 128 bits as hex, or about as many as text.
const MIN_SECRET_LEN: usize = 16;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Place, read and cancel orders; read stock and products.
    Orders,
    /// All of that, plus restock, set prices and read `/metrics`.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Orders => "orders",
            Self::Admin => "admin",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "orders" => Some(Self::Orders),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// One client's key.
#[derive(Clone)]
pub struct ApiKey {
    pub name: String,
    pub role: Role,
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// How callers are authenticated.
#[derive(Debug, Clone)]
pub enum AuthSettings {
    /// `AUTH=off`: every caller may do everything. Local development only.
    Off,
    /// API keys, JWTs, or both.
    On {
        keys: Vec<ApiKey>,
        jwt: Option<JwtSettings>,
    },
}

impl AuthSettings {
    /// `API_KEYS`, or `AUTH=off`; neither is refused, so that a publisher
    /// is never open by accident.
    pub fn read(source: &Source) -> Result<Self, ConfigError> {
        let keys = source.secret(API_KEYS, mask_keys, parse_keys)?;
        let jwt = JwtSettings::read(source)?;
        let off = source.parse(AUTH, |raw| match raw {
            "on" => Ok(false),
            "off" => Ok(true),
            _ => Err("expected on or off".to_owned()),
        })?;
        match (keys, jwt, off) {
            (None, None, true) => Ok(Self::Off),
            (_, _, true) => Err(runtime::config::invalid(
                AUTH,
                "off",
                "API_KEYS, JWT_HS256_SECRET or JWT_JWKS_URL is set too: unset them or AUTH",
            )),
            (None, None, false) => Err(runtime::config::invalid(
                API_KEYS,
                "",
                "not set: give each client a key (name:role:secret, role orders or admin, comma-separated), or set JWT_JWKS_URL or JWT_HS256_SECRET, or AUTH=off to serve without authentication",
            )),
            (keys, jwt, false) => Ok(Self::On {
                keys: keys.unwrap_or_default(),
                jwt,
            }),
        }
    }

    /// For the effective configuration: names and roles, never secrets.
    pub fn describe(&self) -> String {
        match self {
            Self::Off => "off".to_owned(),
            Self::On { keys, jwt } => {
                let mut parts: Vec<String> = keys
                    .iter()
                    .map(|k| format!("{}:{}", k.name, k.role.as_str()))
                    .collect();
                if let Some(jwt) = jwt {
                    parts.push(jwt.describe());
                }
                parts.join(",")
            }
        }
    }
}

/// `API_KEYS` as an error shows it: each key's name and role, its secret
/// masked.
fn mask_keys(raw: &str) -> String {
    raw.split(',')
        .map(|entry| {
            let mut parts = entry.trim().splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(name), Some(role), Some(_)) => format!("{name}:{role}:***"),
                _ => "***".to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_keys(raw: &str) -> Result<Vec<ApiKey>, String> {
    let mut keys = Vec::new();
    let mut names = HashSet::new();
    let mut digests = HashSet::new();
    for (i, entry) in raw.split(',').map(str::trim).enumerate() {
        let n = i + 1;
        let mut parts = entry.splitn(3, ':');
        let (Some(name), Some(role), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("key {n} is not name:role:secret"));
        };
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(format!(
                "key {n}: the name must be letters, digits, '-', '_' or '.'"
            ));
        }
        let role = Role::parse(role)
            .ok_or_else(|| format!("key {name}: role {role:?} is not orders or admin"))?;
        if secret.len() < MIN_SECRET_LEN || secret.chars().any(char::is_whitespace) {
            return Err(format!(
                "key {name}: the secret must be at least {MIN_SECRET_LEN} characters, without spaces"
            ));
        }
        if !names.insert(name.to_owned()) {
            return Err(format!("key {name} is given twice"));
        }
        let digest = digest(secret.as_bytes());
        if !digests.insert(digest) {
            return Err(format!("key {name} has the secret of another key"));
        }
        keys.push(ApiKey {
            name: name.to_owned(),
            role,
            digest,
        });
    }
    Ok(keys)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Who made a request: the key's name or the JWT's subject (for logs and
/// rate limits), its role, and, for a customer, the subject whose orders
/// alone it may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    /// A customer's `sub`: it sees and cancels only the orders it placed.
    pub customer: Option<String>,
}

impl Caller {
    /// `403` unless the caller's role covers `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "the {} role may not do this; it needs {}",
                self.role.as_str(),
                role.as_str()
            )))
        }
    }
}

/// Finds callers by their token.
pub struct Authenticator {
    settings: AuthSettings,
    jwt: Option<JwtVerifier>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator; with `JWT_JWKS_URL`, the key set is fetched now.
    pub async fn start(settings: AuthSettings) -> anyhow::Result<Self> {
        let jwt = match &settings {
            AuthSettings::On { jwt: Some(jwt), .. } => Some(JwtVerifier::start(jwt).await?),
            _ => None,
        };
        Ok(Self { settings, jwt })
    }

    /// The caller a request's `Authorization` header names.
    pub async fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let keys = match &self.settings {
            AuthSettings::Off => {
                return Ok(Caller {
                    name: "anonymous".to_owned(),
                    role: Role::Admin,
                    customer: None,
                });
            }
            AuthSettings::On { keys, .. } => keys,
        };
        let token = bearer(headers)?;
        // Three dot-separated parts: a JWT, where JWTs are accepted. API
        // key secrets made as the README says have no dots.
        if let Some(jwt) = &self.jwt
            && token.split('.').count() == 3
        {
            return jwt.caller(token).await;
        }
        let presented = digest(token.as_bytes());
        // Every key is compared, whichever matches: the time taken does
        // not tell how many keys there are before the right one.
        let mut found = None;
        for key in keys {
            if bool::from(key.digest.ct_eq(&presented)) {
                found = Some(key);
            }
        }
        found
            .map(|key| Caller {
                name: key.name.clone(),
                role: key.role,
                customer: None,
            })
            .ok_or_else(|| ApiError::Unauthenticated("unknown token".into()))
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthenticated("missing Authorization: Bearer <token>".into()))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("Authorization is not ASCII".into()))?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or_else(|| ApiError::Unauthenticated("Authorization is not Bearer <token>".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::Unauthenticated(
            "Authorization is not Bearer <token>".into(),
        ));
    }
    Ok(token.trim())
}

/// Middleware: the request's [`Caller`] in its extensions, or `401`.
pub async fn authenticate(
    State(authenticator): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = authenticator.caller(request.headers()).await?;
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn keys(raw: &str) -> Result<AuthSettings, ConfigError> {
        AuthSettings::read(&Source::from_pairs([("API_KEYS", raw)]))
    }

    fn headers(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        h
    }

    #[tokio::test]
    async fn keys_are_read_with_their_roles_and_never_shown() {
        let settings =
            keys("shop:orders:0123456789abcdef, ops:admin:fedcba9876543210:with:colons").unwrap();
        assert_eq!(settings.describe(), "shop:orders,ops:admin");
        assert!(!format!("{settings:?}").contains("0123456789abcdef"));
        let auth = Authenticator::start(settings).await.unwrap();
        let shop = auth
            .caller(&headers("Bearer 0123456789abcdef"))
            .await
            .unwrap();
        assert_eq!((shop.name.as_str(), shop.role), ("shop", Role::Orders));
        let ops = auth
            .caller(&headers("bearer fedcba9876543210:with:colons"))
            .await
            .unwrap();
        assert_eq!(ops.role, Role::Admin);
        assert!(shop.require(Role::Admin).is_err());
        assert!(ops.require(Role::Orders).is_ok());
    }

    #[tokio::test]
    async fn missing_unknown_and_malformed_tokens_are_unauthenticated() {
        let auth = Authenticator::start(keys("shop:orders:0123456789abcdef").unwrap())
            .await
            .unwrap();
        for bad in [
            "Bearer 0123456789abcdeX",
            "Bearer ",
            "Basic c2hvcDpzZWNyZXQ=",
            "0123456789abcdef",
        ] {
            assert!(
                matches!(
                    auth.caller(&headers(bad)).await,
                    Err(ApiError::Unauthenticated(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            auth.caller(&HeaderMap::new()).await,
            Err(ApiError::Unauthenticated(_))
        ));
    }

    #[test]
    fn bad_keys_are_refused_with_their_secrets_masked() {
        for (raw, reason) in [
            ("shop:root:0123456789abcdef", "role"),
            ("shop:orders:short", "at least 16"),
            ("shop:orders", "name:role:secret"),
            (
                "a:orders:0123456789abcdef,a:admin:0123456789abcdeX",
                "twice",
            ),
            (
                "a:orders:0123456789abcdef,b:admin:0123456789abcdef",
                "another key",
            ),
            ("sh op:orders:0123456789abcdef", "name"),
        ] {
            let e = keys(raw).unwrap_err().to_string();
            assert!(e.starts_with("API_KEYS=\""), "{e}");
            assert!(e.contains(reason), "{raw}: {e}");
            assert!(!e.contains("0123456789abcdef"), "secret shown: {e}");
        }
    }

    #[test]
    fn a_jwt_secret_alone_is_enough_and_a_weak_one_is_refused_unshown() {
        let jwt = AuthSettings::read(&Source::from_pairs([(
            "JWT_HS256_SECRET",
            "0123456789abcdef0123456789abcdef",
        )]))
        .unwrap();
        assert!(
            jwt.describe().starts_with("jwt(HS256"),
            "{}",
            jwt.describe()
        );
        let weak = AuthSettings::read(&Source::from_pairs([("JWT_HS256_SECRET", "short-secret")]))
            .unwrap_err();
        assert_eq!(weak.name, "JWT_HS256_SECRET");
        assert!(!weak.to_string().contains("short-secret"), "{weak}");
        let orphan = AuthSettings::read(&Source::from_pairs([
            ("API_KEYS", "a:admin:0123456789abcdef"),
            ("JWT_ISSUER", "https://id.example.com"),
        ]))
        .unwrap_err();
        assert_eq!(orphan.name, "JWT_HS256_SECRET");
        let jwks = AuthSettings::read(&Source::from_pairs([
            (
                "JWT_JWKS_URL",
                "https://id.example.com/.well-known/jwks.json",
            ),
            ("JWT_ISSUER", "https://id.example.com"),
        ]))
        .unwrap();
        assert_eq!(
            jwks.describe(),
            "jwt(JWKS https://id.example.com/.well-known/jwks.json, issuer https://id.example.com, audience any)"
        );
        for (name, value) in [
            ("JWT_JWKS_URL", "ftp://id.example.com/keys"),
            ("JWT_JWKS_CA_FILE", "/nonexistent/ca.pem"),
        ] {
            let bad = AuthSettings::read(&Source::from_pairs([
                ("JWT_JWKS_URL", "https://id.example.com/keys"),
                (name, value),
            ]))
            .unwrap_err();
            assert_eq!(bad.name, name);
        }
    }

    #[test]
    fn no_keys_is_refused_unless_auth_is_off() {
        let e = AuthSettings::read(&Source::default()).unwrap_err();
        assert_eq!(e.name, "API_KEYS");
        assert!(e.reason.contains("AUTH=off"), "{e}");
        let off = AuthSettings::read(&Source::from_pairs([("AUTH", "off")])).unwrap();
        assert!(matches!(off, AuthSettings::Off));
        let both = AuthSettings::read(&Source::from_pairs([
            ("AUTH", "off"),
            ("API_KEYS", "a:admin:0123456789abcdef"),
        ]));
        assert!(both.is_err());
        assert!(AuthSettings::read(&Source::from_pairs([("AUTH", "maybe")])).is_err());
    }
}
