//! JSON Web Tokens: signed with a shared secret (`JWT_HS256_SECRET`) or
//! with one of the identity provider's public keys (`JWT_JWKS_URL`: RS*,
//! PS*, ES256/ES384, EdDSA), with `exp` and `sub` required and, where
//! configured, `iss` and `aud` checked.
//!
//! The token's header picks the key, never the algorithm's family: an
//! `HS256` token is checked only against the shared secret, any other only
//! against the key set, and a key set's key only with the algorithm it is
//! for. So a token signed with a public key as an HMAC secret, or with
//! `alg: none`, names no key and is refused.

use super::jwks::{KeySet, Lookup};
use super::{Caller, Role};
use crate::error::ApiError;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use runtime::config::{ConfigError, Source, Var};
use std::path::PathBuf;
use std::sync::Arc;

const JWT_HS256_SECRET: Var = Var::optional("JWT_HS256_SECRET");
const JWT_JWKS_URL: Var = Var::optional("JWT_JWKS_URL");
const JWT_JWKS_CA_FILE: Var = Var::optional("JWT_JWKS_CA_FILE");
const JWT_ISSUER: Var = Var::optional("JWT_ISSUER");
const JWT_AUDIENCE: Var = Var::optional("JWT_AUDIENCE");

/// The shortest HS256 secret accepted: the hash's size (RFC 7518, 3.2).
const MIN_JWT_SECRET_LEN: usize = 32;
/// Clock skew allowed on `exp` and `nbf`.
const JWT_LEEWAY_SECONDS: u64 = 30;

/// The algorithms a key set's keys may sign with.
const PUBLIC_KEY_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// How JWTs are checked.
#[derive(Clone)]
pub struct JwtSettings {
    hs256: Option<DecodingKey>,
    pub jwks_url: Option<String>,
    pub jwks_ca_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl std::fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSettings")
            .field("hs256", &self.hs256.is_some())
            .field("jwks_url", &self.jwks_url)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl JwtSettings {
    /// The JWT variables; `None` when neither a secret nor a key set is
    /// given (and then issuer and audience may not be either).
    pub fn read(source: &Source) -> Result<Option<Self>, ConfigError> {
        let hs256 = source.secret(
            JWT_HS256_SECRET,
            |_| "***".to_owned(),
            |raw| {
                if raw.len() < MIN_JWT_SECRET_LEN {
                    Err(format!("must be at least {MIN_JWT_SECRET_LEN} bytes"))
                } else {
                    DecodingKey::from_secret(raw.as_bytes()).map_err(|e| e.to_string())
                }
            },
        )?;
        let jwks_url = source.optional(JWT_JWKS_URL, |raw| {
            topology::https::check_url(raw).map(|()| raw.to_owned())
        })?;
        // Read now: a CA file that cannot be used stops the publisher at
        // start, not at the first token.
        let jwks_ca_file = source.optional(JWT_JWKS_CA_FILE, |raw| {
            let path = PathBuf::from(raw);
            topology::https::extra_roots(&path).map(|_| path)
        })?;
        let text = |raw: &str| Ok::<_, String>(raw.to_owned());
        let issuer = source.optional(JWT_ISSUER, text)?;
        let audience = source.optional(JWT_AUDIENCE, text)?;
        if hs256.is_none() && jwks_url.is_none() {
            if issuer.is_some() || audience.is_some() {
                return Err(runtime::config::invalid(
                    JWT_HS256_SECRET,
                    "",
                    "not set (nor JWT_JWKS_URL), but JWT_ISSUER or JWT_AUDIENCE is: JWTs need the key they are signed with",
                ));
            }
            if jwks_ca_file.is_some() {
                return Err(runtime::config::invalid(
                    JWT_JWKS_URL,
                    "",
                    "not set, but JWT_JWKS_CA_FILE is",
                ));
            }
            return Ok(None);
        }
        Ok(Some(Self {
            hs256,
            jwks_url,
            jwks_ca_file,
            issuer,
            audience,
        }))
    }

    /// For the effective configuration.
    pub fn describe(&self) -> String {
        let mut keys = Vec::new();
        if self.hs256.is_some() {
            keys.push("HS256".to_owned());
        }
        if let Some(url) = &self.jwks_url {
            keys.push(format!("JWKS {url}"));
        }
        format!(
            "jwt({}, issuer {}, audience {})",
            keys.join(" + "),
            self.issuer.as_deref().unwrap_or("any"),
            self.audience.as_deref().unwrap_or("any")
        )
    }
}

/// Checks tokens as [`JwtSettings`] say.
pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    key_set: Option<Arc<KeySet>>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl JwtVerifier {
    /// A verifier; with `JWT_JWKS_URL`, the key set is fetched now and kept
    /// fresh by a task of its own.
    pub async fn start(settings: &JwtSettings) -> anyhow::Result<Self> {
        let key_set = match &settings.jwks_url {
            Some(url) => {
                let mut builder = topology::https::client_builder();
                if let Some(ca_file) = &settings.jwks_ca_file {
                    let roots =
                        topology::https::extra_roots(ca_file).map_err(anyhow::Error::msg)?;
                    builder = builder.tls_certs_merge(roots);
                }
                Some(KeySet::start(url.clone(), builder.build()?).await)
            }
            None => None,
        };
        Ok(Self {
            hs256: settings.hs256.clone(),
            key_set,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
        })
    }

    /// The caller a JWT names, once its signature, expiry and, where
    /// configured, issuer and audience are checked.
    pub async fn caller(&self, token: &str) -> Result<Caller, ApiError> {
        let invalid = |why: String| ApiError::Unauthenticated(format!("invalid token: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(e.to_string()))?;
        let key = if header.alg == Algorithm::HS256 {
            self.hs256
                .clone()
                .ok_or_else(|| invalid("HS256 tokens are not accepted".into()))?
        } else if PUBLIC_KEY_ALGORITHMS.contains(&header.alg) {
            let key_set = self
                .key_set
                .as_ref()
                .ok_or_else(|| invalid(format!("{:?} tokens are not accepted", header.alg)))?;
            let key = key_set
                .find(header.kid.as_deref())
                .await
                .map_err(|lookup| match lookup {
                    Lookup::Unavailable => ApiError::Unavailable(
                        "the identity provider's signing keys cannot be fetched; retry later"
                            .into(),
                    ),
                    Lookup::Unknown => {
                        invalid("signed with a key the identity provider does not publish".into())
                    }
                })?;
            if key.algorithm.is_some_and(|alg| alg != header.alg) {
                return Err(invalid(format!(
                    "its key is for another algorithm than {:?}",
                    header.alg
                )));
            }
            key.key
        } else {
            return Err(invalid(format!("{:?} tokens are not accepted", header.alg)));
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &self.validation(header.alg))
            .map_err(|e| invalid(e.to_string()))?
            .claims;
        caller_of(claims)
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = JWT_LEEWAY_SECONDS;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }
}

/// The claims a JWT must carry; `scope` is space-separated (RFC 8693).
#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: String,
}

/// `admin` in the scope: an operator; `orders`: a customer, who sees only
/// the orders it placed.
fn caller_of(claims: Claims) -> Result<Caller, ApiError> {
    if claims.sub.is_empty() {
        return Err(ApiError::Unauthenticated("invalid token: empty sub".into()));
    }
    let scopes: Vec<&str> = claims.scope.split_whitespace().collect();
    let name = format!("jwt:{}", claims.sub);
    if scopes.contains(&"admin") {
        Ok(Caller {
            name,
            role: Role::Admin,
            customer: None,
        })
    } else if scopes.contains(&"orders") {
        Ok(Caller {
            name,
            role: Role::Orders,
            customer: Some(claims.sub),
        })
    } else {
        Err(ApiError::Forbidden(
            "the token's scope grants neither orders nor admin".into(),
        ))
    }
}
