//! A small client for the RabbitMQ management HTTP API, used to compare the
//! live broker with the declared topology and by tests to make vhosts.

use crate::addresses::{BrokerAddresses, url_host};
use serde_json::Value;
use settings::Var;

/// `RABBITMQ_MANAGEMENT_URL`; unset, port 15672 on the broker's host.
pub const RABBITMQ_MANAGEMENT_URL: Var = Var::optional("RABBITMQ_MANAGEMENT_URL");
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("the management API at {url} did not answer: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the management API answered {status} to {method} {url}: {body}")]
    Status {
        method: &'static str,
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("AMQP_URL is not a valid AMQP URL: {0}")]
    BadAmqpUrl(String),
}

/// Where the management API lives and how to log in.
#[derive(Clone)]
pub struct Management {
    base: String,
    user: String,
    password: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("base", &self.base)
            .field("user", &self.user)
            .field("password", &"********")
            .finish()
    }
}

impl Management {
    pub fn new(base: &str, user: &str, password: &str) -> Self {
        let http = crate::https::client_builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
            http,
        }
    }

    /// The management API beside the broker of `amqp_url` (port 15672 of
    /// its first node, same credentials) unless `explicit` names another one.
    pub fn for_amqp_url(
        amqp_url: &str,
        explicit: Option<&str>,
    ) -> Result<(Self, String), ManagementError> {
        let (mut apis, vhost) = Self::of_every_node(amqp_url, explicit)?;
        // `of_every_node` gives one per node, and there is at least one.
        Ok((apis.swap_remove(0), vhost))
    }

    /// The first management API that answers, of the nodes of `amqp_url`
    /// in their order (port 15672 of each, same credentials), unless
    /// `explicit` names one: a cluster with its first node down is still
    /// checked.
    pub async fn reachable_for_amqp_url(
        amqp_url: &str,
        explicit: Option<&str>,
    ) -> Result<(Self, String), ManagementError> {
        let (mut apis, vhost) = Self::of_every_node(amqp_url, explicit)?;
        // The last is taken without asking: if it does not answer either,
        // the caller's own request says so.
        let last = apis.pop();
        for api in apis {
            match api.get("overview").await {
                Ok(_) => return Ok((api, vhost)),
                Err(e) => {
                    tracing::warn!(management = %api.base, error = %e, "Management API unreachable");
                }
            }
        }
        // `of_every_node` gives at least one.
        last.map(|api| (api, vhost))
            .ok_or_else(|| ManagementError::BadAmqpUrl("no node".into()))
    }

    /// One per node of `amqp_url`, or only `explicit`; and the vhost.
    fn of_every_node(
        amqp_url: &str,
        explicit: Option<&str>,
    ) -> Result<(Vec<Self>, String), ManagementError> {
        let addresses = BrokerAddresses::parse(amqp_url)
            .map_err(|e| ManagementError::BadAmqpUrl(e.to_string()))?;
        let first = addresses.first();
        let info = &first.authority.userinfo;
        let bases: Vec<String> = match explicit {
            Some(url) => vec![url.to_owned()],
            None => addresses
                .nodes()
                .iter()
                .map(|node| format!("http://{}:15672", url_host(node)))
                .collect(),
        };
        let apis = bases
            .iter()
            .map(|base| Self::new(base, &info.username, &info.password))
            .collect();
        Ok((apis, first.vhost.clone()))
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str) -> Result<Value, ManagementError> {
        let url = format!("{}/api/{path}", self.base);
        let response = self
            .http
            .get(&url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|source| ManagementError::Unreachable {
                url: url.clone(),
                source,
            })?;
        check("GET", &url, response)
            .await?
            .json()
            .await
            .map_err(|source| ManagementError::Unreachable { url, source })
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<(), ManagementError> {
        let url = format!("{}/api/{path}", self.base);
        let response = self
            .http
            .put(&url)
            .basic_auth(&self.user, Some(&self.password))
            .json(body)
            .send()
            .await
            .map_err(|source| ManagementError::Unreachable {
                url: url.clone(),
                source,
            })?;
        check("PUT", &url, response).await.map(drop)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<(), ManagementError> {
        let url = format!("{}/api/{path}", self.base);
        let response = self
            .http
            .post(&url)
            .basic_auth(&self.user, Some(&self.password))
            .json(body)
            .send()
            .await
            .map_err(|source| ManagementError::Unreachable {
                url: url.clone(),
                source,
            })?;
        check("POST", &url, response).await.map(drop)
    }

    pub async fn delete(&self, path: &str) -> Result<(), ManagementError> {
        let url = format!("{}/api/{path}", self.base);
        let response = self
            .http
            .delete(&url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|source| ManagementError::Unreachable {
                url: url.clone(),
                source,
            })?;
        check("DELETE", &url, response).await.map(drop)
    }
}

async fn check(
    method: &'static str,
    url: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response, ManagementError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(ManagementError::Status {
        method,
        url: url.to_owned(),
        status,
        body,
    })
}

/// Percent-encodes a vhost name for a management API path (`/` is `%2F`).
pub fn encode_vhost(vhost: &str) -> String {
    let mut out = String::with_capacity(vhost.len());
    for b in vhost.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
