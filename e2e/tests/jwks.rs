//! JWTs signed with an identity provider's keys (`JWT_JWKS_URL`), against
//! a key set served over HTTP by the test as a provider serves it: RS256
//! and ES256 keys are taken, a rotated key is fetched when a token first
//! names it, unknown `kid`s do not flood the provider, every forgery is
//! refused, and a provider that cannot be reached is a `503`, not a `401`.
#![allow(clippy::unwrap_used)]

use axum::extract::State;
use axum::routing::get;
use base64::Engine;
use e2e::{JWT_AUDIENCE, JWT_ISSUER, Options, System};
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A key pair made with `openssl`: the private half signs, the public
/// half goes in the key set.
struct KeyPair {
    kid: String,
    algorithm: Algorithm,
    signing: EncodingKey,
    pem: Vec<u8>,
}

impl KeyPair {
    fn make(kid: &str, algorithm: Algorithm) -> Self {
        let dir = std::env::temp_dir().join(format!("jwks-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key.pem");
        let options: &[&str] = match algorithm {
            Algorithm::RS256 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            Algorithm::ES256 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            other => panic!("no key for {other:?}"),
        };
        let made = std::process::Command::new("openssl")
            .arg("genpkey")
            .args(options)
            .arg("-out")
            .arg(&path)
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        let pem = std::fs::read(&path).unwrap();
        // DER as jsonwebtoken reads it without PEM support: PKCS#1 for
        // RSA, PKCS#8 for EC.
        let der = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .arg("-in")
                .arg(&path)
                .args(["-outform", "DER"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            out.stdout
        };
        let signing = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_der(&der(&["rsa", "-traditional"])),
            _ => EncodingKey::from_ec_der(&der(&["pkcs8", "-topk8", "-nocrypt"])),
        };
        std::fs::remove_dir_all(&dir).unwrap();
        Self {
            kid: kid.to_owned(),
            algorithm,
            signing,
            pem,
        }
    }

    /// The public key as the provider publishes it.
    fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.signing, self.algorithm).unwrap();
        jwk.common.key_id = Some(self.kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        jwk
    }

    /// A token for `sub` with `scope`, by the configured issuer for the
    /// configured audience, valid for an hour; `claims` laid over those.
    fn token(&self, sub: &str, scope: &str, claims: Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        sign(&header, &self.signing, sub, scope, claims)
    }
}

fn sign(header: &Header, key: &EncodingKey, sub: &str, scope: &str, claims: Value) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut body = json!({
        "sub": sub, "scope": scope, "iss": JWT_ISSUER, "aud": JWT_AUDIENCE,
        "iat": now, "exp": now + 3600,
    });
    for (k, v) in claims.as_object().unwrap() {
        body[k] = v.clone();
    }
    jsonwebtoken::encode(header, &body, key).unwrap()
}

/// The provider's key set endpoint, counting the fetches.
#[derive(Clone)]
struct Provider {
    keys: Arc<Mutex<JwkSet>>,
    fetches: Arc<AtomicUsize>,
}

impl Provider {
    async fn serve(keys: Vec<Jwk>) -> (Self, String) {
        let provider = Self {
            keys: Arc::new(Mutex::new(JwkSet { keys })),
            fetches: Arc::new(AtomicUsize::new(0)),
        };
        let router = axum::Router::new()
            .route(
                "/.well-known/jwks.json",
                get(|State(p): State<Provider>| async move {
                    p.fetches.fetch_add(1, Ordering::SeqCst);
                    let set = p.keys.lock().unwrap().clone();
                    axum::Json(set)
                }),
            )
            .with_state(provider.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, router).await });
        (provider, url)
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// A system whose publisher takes the provider's tokens, and the admin
/// API key of [`e2e::test_keys`].
async fn system_trusting(jwks_url: &str) -> System {
    let keys = format!("e2e-admin:admin:{}", e2e::ADMIN_TOKEN);
    let auth = publisher::auth::AuthSettings::read(&runtime::config::Source::from_pairs([
        ("API_KEYS", keys.as_str()),
        ("JWT_JWKS_URL", jwks_url),
        ("JWT_ISSUER", JWT_ISSUER),
        ("JWT_AUDIENCE", JWT_AUDIENCE),
    ]))
    .unwrap();
    System::start(Options {
        auth: Some(auth),
        ..Options::default()
    })
    .await
}

async fn status(system: &System, token: &str, path: &str) -> StatusCode {
    e2e::client_with_token(token)
        .get(format!("{}{path}", system.api))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_signed_with_the_providers_keys_are_taken_and_a_rotation_is_followed() {
    let rsa = KeyPair::make("rsa-1", Algorithm::RS256);
    let ec = KeyPair::make("ec-1", Algorithm::ES256);
    let (provider, url) = Provider::serve(vec![rsa.jwk(), ec.jwk()]).await;
    let system = system_trusting(&url).await;
    assert_eq!(provider.fetches(), 1, "fetched once at start");

    // A customer places an order and reads it; nobody else's.
    let ada = e2e::client_with_token(&rsa.token("customer-ada", "orders", json!({})));
    system.stock("SKU-J", 5).await;
    let placed = ada
        .post(format!("{}/orders", system.api))
        .json(
            &json!({"customer_email": "ada@example.com", "currency": "EUR",
                      "items": [{"sku": "SKU-J", "quantity": 1}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), StatusCode::ACCEPTED);
    let id = placed.json::<Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(system.wait_final(&id).await["status"], "CONFIRMED");
    let own = format!("/orders/{id}");
    assert_eq!(
        status(
            &system,
            &rsa.token("customer-ada", "orders", json!({})),
            &own
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        status(
            &system,
            &ec.token("customer-eve", "orders", json!({})),
            &own
        )
        .await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status(&system, &ec.token("ops", "admin", json!({})), "/metrics").await,
        StatusCode::OK
    );
    assert_eq!(
        status(
            &system,
            &rsa.token("customer-ada", "orders", json!({})),
            "/metrics"
        )
        .await,
        StatusCode::FORBIDDEN
    );

    // The provider rotates: a token naming the new key fetches the set.
    let rotated = KeyPair::make("rsa-2", Algorithm::RS256);
    *provider.keys.lock().unwrap() = JwkSet {
        keys: vec![rotated.jwk()],
    };
    assert_eq!(
        status(
            &system,
            &rotated.token("customer-ada", "orders", json!({})),
            &own
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(provider.fetches(), 2);
    // The retired key is gone with the set it was in.
    assert_eq!(
        status(
            &system,
            &rsa.token("customer-ada", "orders", json!({})),
            &own
        )
        .await,
        StatusCode::UNAUTHORIZED
    );
    // Made-up kids right after a fetch do not make the publisher fetch again.
    for n in 0..20 {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(format!("made-up-{n}"));
        let token = sign(&header, &rotated.signing, "eve", "admin", json!({}));
        assert_eq!(
            status(&system, &token, "/metrics").await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(provider.fetches(), 2);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_expired_and_misdirected_tokens_are_refused() {
    let rsa = KeyPair::make("rsa-1", Algorithm::RS256);
    let ec = KeyPair::make("ec-1", Algorithm::ES256);
    let (_provider, url) = Provider::serve(vec![rsa.jwk(), ec.jwk()]).await;
    let system = system_trusting(&url).await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = chrono::Utc::now().timestamp();

    // Signed by a key the provider never published, claiming its kid.
    let impostor = KeyPair::make("rsa-1", Algorithm::RS256);
    // The provider's public key used as an HMAC secret (algorithm confusion).
    let mut hs256 = Header::new(Algorithm::HS256);
    hs256.kid = Some("rsa-1".into());
    let public_pem = std::process::Command::new("openssl")
        .args(["pkey", "-pubout"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&rsa.pem).unwrap();
            child.wait_with_output().unwrap().stdout
        })
        .unwrap();
    let confused = sign(
        &hs256,
        &EncodingKey::from_secret(&public_pem).unwrap(),
        "eve",
        "admin",
        json!({}),
    );
    // `alg: none`, no signature.
    let unsigned = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
        b64.encode(
            json!({"sub": "eve", "scope": "admin", "exp": now + 3600,
                          "iss": JWT_ISSUER, "aud": JWT_AUDIENCE})
            .to_string()
        )
    );
    // A key set's key used with another algorithm than its own.
    let mut swapped = Header::new(Algorithm::PS256);
    swapped.kid = Some("rsa-1".into());
    let swapped = sign(&swapped, &rsa.signing, "eve", "admin", json!({}));
    // Two keys in the set, and no kid to choose between them.
    let no_kid = sign(
        &Header::new(Algorithm::RS256),
        &rsa.signing,
        "eve",
        "admin",
        json!({}),
    );
    // A signature of the right key over other claims.
    let good = rsa.token("eve", "orders", json!({}));
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(
            json!({"sub": "eve", "scope": "admin", "exp": now + 3600,
                          "iss": JWT_ISSUER, "aud": JWT_AUDIENCE})
            .to_string()
        ),
        parts[2]
    );
    for (what, token) in [
        (
            "an impostor's key",
            impostor.token("eve", "admin", json!({})),
        ),
        ("HS256 with the public key", confused),
        ("alg none", unsigned),
        ("PS256 with an RS256 key", swapped),
        ("no kid among two keys", no_kid),
        ("tampered claims", tampered),
        (
            "expired",
            rsa.token("eve", "admin", json!({"exp": now - 3600})),
        ),
        (
            "another issuer",
            ec.token("eve", "admin", json!({"iss": "https://evil.example"})),
        ),
        (
            "another audience",
            ec.token("eve", "admin", json!({"aud": "another-api"})),
        ),
        ("no sub", {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some("ec-1".into());
            let body = json!({"scope": "admin", "exp": now + 3600, "iss": JWT_ISSUER, "aud": JWT_AUDIENCE});
            jsonwebtoken::encode(&header, &body, &ec.signing).unwrap()
        }),
    ] {
        let response = e2e::client_with_token(&token)
            .get(format!("{}/metrics", system.api))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{what}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().starts_with("invalid token"),
            "{what}: {body}"
        );
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_out_of_reach_answers_503_for_tokens_and_api_keys_still_work() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/.well-known/jwks.json",
        closed.local_addr().unwrap()
    );
    drop(closed);
    let system = system_trusting(&url).await;
    let rsa = KeyPair::make("rsa-1", Algorithm::RS256);
    let response = e2e::client_with_token(&rsa.token("ops", "admin", json!({})))
        .get(format!("{}/metrics", system.api))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        status(&system, e2e::ADMIN_TOKEN, "/metrics").await,
        StatusCode::OK
    );
    system.stop().await;
}
