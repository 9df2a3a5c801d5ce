//! The identity provider's signing keys, fetched from `JWT_JWKS_URL` (a
//! JSON Web Key Set, RFC 7517) and kept in memory.
//!
//! Fetched at start and every [`REFRESH_EVERY`]; a token signed with a key
//! the set does not hold yet (the provider rotated its keys) fetches it at
//! once, but such fetches happen at most every [`REFETCH_AT_MOST_EVERY`],
//! so that tokens with made-up `kid`s cannot make the publisher flood the
//! provider. A fetch
//! that fails keeps the keys held; until a first fetch succeeds, tokens
//! that need the set are answered `503`, not `401`: the caller is not at
//! fault.
//!
//! Only public keys for signatures are taken: `oct` (shared secret) keys
//! and keys marked `"use": "enc"` are skipped, so that a key set can never
//! turn a token's signature into one anybody can make.

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How often the key set is fetched again, whatever the tokens say.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// The shortest time between two fetches caused by unknown `kid`s.
pub const REFETCH_AT_MOST_EVERY: Duration = Duration::from_secs(30);
/// The largest key set read.
const MAX_BYTES: usize = 1 << 20;
/// A fetch that takes longer fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One signing key of the set.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: Option<String>,
    pub key: DecodingKey,
    /// The algorithm the key is for, where the set says (`alg`).
    pub algorithm: Option<Algorithm>,
}

/// Why a key was not found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// No key set could be fetched yet.
    Unavailable,
    /// The set holds no key with the token's `kid` (or, without one, not
    /// exactly one key).
    Unknown,
}

/// The key set of `JWT_JWKS_URL`.
pub struct KeySet {
    url: String,
    http: reqwest::Client,
    keys: RwLock<Option<Arc<Vec<SigningKey>>>>,
    /// When the last fetch for an unknown key started; one fetch at a time.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl KeySet {
    /// A key set for `url`, fetched now and every [`REFRESH_EVERY`] by a
    /// task that ends when the set is dropped.
    pub async fn start(url: String, http: reqwest::Client) -> Arc<Self> {
        let set = Arc::new(Self {
            url,
            http,
            keys: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(None),
        });
        set.refetch(Cause::Schedule).await;
        tokio::spawn(refresh_while_alive(Arc::downgrade(&set)));
        set
    }

    /// The key a token with header `kid` is signed with, fetching the set
    /// again (within the rate) when it does not hold it.
    pub async fn find(&self, kid: Option<&str>) -> Result<SigningKey, Lookup> {
        match self.held(kid) {
            Ok(key) => return Ok(key),
            Err(_) => self.refetch(Cause::UnknownKey).await,
        }
        self.held(kid)
    }

    fn held(&self, kid: Option<&str>) -> Result<SigningKey, Lookup> {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(Lookup::Unavailable)?;
        let found = match kid {
            Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            // A token without `kid` names no key: only a set of one answers.
            None if keys.len() == 1 => keys.first(),
            None => None,
        };
        found.cloned().ok_or(Lookup::Unknown)
    }

    /// Fetches the set; for an unknown key, only if the last such fetch
    /// started [`REFETCH_AT_MOST_EVERY`] ago or more (callers that queue
    /// behind a fetch do not fetch again).
    async fn refetch(&self, cause: Cause) {
        let mut last = self.fetching.lock().await;
        if cause == Cause::UnknownKey {
            if last.is_some_and(|at| at.elapsed() < REFETCH_AT_MOST_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        match self.fetch().await {
            Ok(keys) => {
                info!(url = %self.url, keys = keys.len(), "Fetched the JWT signing keys");
                *self
                    .keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(keys));
            }
            Err(e) => {
                warn!(url = %self.url, error = %e, "Cannot fetch the JWT signing keys; keeping those held")
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<SigningKey>, String> {
        let mut response = self
            .http
            .get(&self.url)
            .timeout(FETCH_TIMEOUT)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_BYTES {
                return Err(format!("the key set is larger than {MAX_BYTES} bytes"));
            }
        }
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
        Ok(signing_keys(&set))
    }
}

/// Why the set is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// At start, and every [`REFRESH_EVERY`].
    Schedule,
    /// A token names a key the set does not hold.
    UnknownKey,
}

/// The set's public signing keys; the others are skipped, each logged.
fn signing_keys(set: &JwkSet) -> Vec<SigningKey> {
    set.keys
        .iter()
        .filter_map(|jwk| match signing_key(jwk) {
            Ok(key) => Some(key),
            Err(why) => {
                warn!(kid = ?jwk.common.key_id, reason = why, "JWT signing key skipped");
                None
            }
        })
        .collect()
}

fn signing_key(jwk: &Jwk) -> Result<SigningKey, &'static str> {
    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
        return Err("a shared-secret (oct) key; only public keys are taken from a key set");
    }
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("a key for encryption, not signatures");
    }
    let algorithm = match jwk.common.key_algorithm {
        // RSA-OAEP and other algorithms for encryption do not parse.
        Some(alg) => Some(
            alg.to_string()
                .parse::<Algorithm>()
                .map_err(|_| "an algorithm not for signatures")?,
        ),
        None => None,
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "a key that cannot be read")?;
    Ok(SigningKey {
        kid: jwk.common.key_id.clone(),
        key,
        algorithm,
    })
}

async fn refresh_while_alive(set: Weak<KeySet>) {
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        let Some(set) = set.upgrade() else {
            return;
        };
        set.refetch(Cause::Schedule).await;
    }
}
