//! Where the broker is: `AMQP_URL` names one node, or the nodes of a
//! cluster listed in its authority as libpq lists PostgreSQL hosts:
//! `amqp://user:password@rabbit-1:5672,rabbit-2:5672,rabbit-3/vhost?heartbeat=30`.
//! One user, vhost and query for every node, so a list cannot mix vhosts
//! or credentials by mistake.
//!
//! The crate that names the broker's exchanges and queues also reads its
//! address, so that `topology` and the runtime (which depends on this
//! crate) read `AMQP_URL` the same way.
//!
//! `amqps://` speaks TLS (rustls), always verifying the broker's
//! certificate and name against the platform's roots and, where the query
//! names one, a CA of the deployment's own: `?cacertfile=/path/ca.pem`,
//! RabbitMQ's URI parameter. `certfile` and `keyfile` (PEM) present a
//! client certificate. The files are read at every connection, so a
//! renewed certificate is taken at the next reconnect.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{ConnectionProperties, DefaultConnectionBuilder};
use settings::{ConfigError, SecretUrl, Source, Var};
use std::fmt;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tracing::{info, warn};

/// The node this process tries first: the last one it reached, so that a
/// worker's connections go to one node; at first a random one, so that
/// replicas spread their connections over the cluster.
static PREFERRED: LazyLock<AtomicUsize> =
    LazyLock::new(|| AtomicUsize::new(rand::random::<u16>() as usize));

/// `AMQP_URL`: the broker, or the nodes of a cluster; its path is the vhost.
pub const AMQP_URL: Var = Var::new("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");

/// `AMQP_URL`, read and parsed at start: a URL the client cannot read is
/// bad configuration, reported at once (password masked), not a broker to
/// wait for.
pub fn amqp_url(source: &Source) -> Result<SecretUrl, ConfigError> {
    source.secret_url(AMQP_URL, |url| {
        let addresses =
            BrokerAddresses::parse(url).map_err(|reason| format!("not an AMQP URL: {reason}"))?;
        // The TLS files must be there at start, not at the first reconnect.
        addresses.tls().load().map(|_| ())
    })
}

/// The nodes an `AMQP_URL` names, in the order it names them.
#[derive(Clone, Debug)]
pub struct BrokerAddresses {
    nodes: Vec<AMQPUri>,
    tls: TlsFiles,
}

/// The TLS files an `amqps://` URL's query names (RabbitMQ's URI
/// parameters): a CA to trust beside the platform's roots, and a client
/// certificate with its key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cacertfile: Option<String>,
    pub certfile: Option<String>,
    pub keyfile: Option<String>,
}

impl TlsFiles {
    /// The parameters in `query` (without its `?`); TLS parameters on an
    /// `amqp://` URL are refused, so that nobody believes a plain
    /// connection is encrypted.
    fn read(query: &str, scheme: AMQPScheme) -> Result<Self, AddressError> {
        let mut files = Self::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "cacertfile" => &mut files.cacertfile,
                "certfile" => &mut files.certfile,
                "keyfile" => &mut files.keyfile,
                "verify" if value == "verify_peer" => continue,
                "verify" => {
                    return Err(AddressError::Bad(format!(
                        "verify={value}: the broker's certificate is always verified; give its CA in cacertfile"
                    )));
                }
                _ => continue,
            };
            if value.is_empty() {
                return Err(AddressError::Bad(format!("{key} is empty")));
            }
            *slot = Some(value.into_owned());
        }
        if files != Self::default() && scheme != AMQPScheme::AMQPS {
            return Err(AddressError::Bad(
                "cacertfile, certfile and keyfile are for amqps:// URLs; this one is amqp:// (no TLS)"
                    .to_owned(),
            ));
        }
        if files.certfile.is_some() != files.keyfile.is_some() {
            return Err(AddressError::Bad(
                "certfile and keyfile go together (a client certificate and its key)".to_owned(),
            ));
        }
        Ok(files)
    }

    /// The files' contents as lapin takes them; an unreadable or
    /// certificate-less file is an error naming it.
    pub fn load(&self) -> Result<OwnedTLSConfig, String> {
        let read = |path: &str| std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"));
        let cert_chain = match &self.cacertfile {
            Some(path) => {
                let pem = String::from_utf8(read(path)?)
                    .map_err(|_| format!("{path} is not a PEM file"))?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!("{path} holds no PEM certificate"));
                }
                Some(pem)
            }
            None => None,
        };
        let identity = match (&self.certfile, &self.keyfile) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read(cert)?,
                key: read(key)?,
            }),
            _ => None,
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }
}

/// Why an `AMQP_URL` cannot be read. Never contains the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error(
        "several URLs given; list the nodes in one URL's authority instead, as in amqp://user:password@rabbit-1:5672,rabbit-2:5672/vhost"
    )]
    SeveralUrls,
    #[error("node {position} of the list is empty")]
    EmptyNode { position: usize },
    #[error("node {position} ({node}): {reason}")]
    BadNode {
        position: usize,
        node: String,
        reason: String,
    },
    #[error("{0}")]
    Bad(String),
}

impl BrokerAddresses {
    /// Reads `url`; each node's URL must be one lapin reads.
    pub fn parse(url: &str) -> Result<Self, AddressError> {
        let url = url.trim();
        let Some(split) = Split::of(url) else {
            // No authority to list nodes in: lapin says what is wrong.
            let node = url.parse::<AMQPUri>().map_err(AddressError::Bad)?;
            return Ok(Self {
                nodes: vec![node],
                tls: TlsFiles::default(),
            });
        };
        if split.rest.contains("://") {
            return Err(AddressError::SeveralUrls);
        }
        let hosts: Vec<&str> = split.hosts.split(',').map(str::trim).collect();
        let several = hosts.len() > 1;
        let mut nodes = Vec::with_capacity(hosts.len());
        for (i, host) in hosts.iter().enumerate() {
            let position = i + 1;
            if host.is_empty() && several {
                return Err(AddressError::EmptyNode { position });
            }
            let one = format!("{}{}{}{}", split.scheme, split.userinfo, host, split.rest);
            let mut node = one.parse::<AMQPUri>().map_err(|reason| {
                if several {
                    AddressError::BadNode {
                        position,
                        node: (*host).to_owned(),
                        reason,
                    }
                } else {
                    AddressError::Bad(reason)
                }
            })?;
            // lapin reads an IPv6 literal as `localhost` (it takes the URL's
            // domain, which an IP address has not): keep the address itself.
            if let Some(address) = host.strip_prefix('[').and_then(|h| h.split(']').next()) {
                node.authority.host = address.to_owned();
            }
            nodes.push(node);
        }
        let query = split.rest.split_once('?').map_or("", |(_, query)| query);
        let query = query.split('#').next().unwrap_or_default();
        let tls = TlsFiles::read(query, nodes[0].scheme.clone())?;
        Ok(Self { nodes, tls })
    }

    /// The TLS files the URL names (none for `amqp://`).
    pub fn tls(&self) -> &TlsFiles {
        &self.tls
    }

    /// Every node, in the order `AMQP_URL` names them; never empty.
    pub fn nodes(&self) -> &[AMQPUri] {
        &self.nodes
    }

    /// Opens a connection named `name` to the first node that answers,
    /// trying each once from the preferred one, each within `timeout`.
    /// `frame_max` is proposed unless the URL names one. With one node its
    /// error is returned as it is; with several, every node's.
    pub async fn connect(
        &self,
        name: &str,
        frame_max: Option<u32>,
        timeout: Duration,
    ) -> Result<lapin::Connection, lapin::Error> {
        let tls = self.tls.load().map_err(|reason| {
            lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                reason,
            ))
        })?;
        let count = self.nodes.len();
        let start = PREFERRED.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for index in (start..count).chain(0..start) {
            let mut uri = self.nodes[index].clone();
            if let Some(frame_max) = frame_max {
                uri.query.frame_max.get_or_insert(frame_max);
            }
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            let builder = DefaultConnectionBuilder::new()?
                .with_uri(uri)
                .with_properties(properties)
                .with_tls_config(tls.clone());
            let connecting = builder.connect();
            let error = match tokio::time::timeout(timeout, connecting).await {
                Ok(Ok(connection)) => {
                    PREFERRED.store(index, Ordering::Relaxed);
                    if count > 1 {
                        info!(connection = name, node = %node_name(&self.nodes[index]), "Connected to a broker node");
                    }
                    return Ok(connection);
                }
                Ok(Err(e)) => e,
                Err(_) => lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting to the broker timed out",
                )),
            };
            if count == 1 {
                return Err(error);
            }
            if failures.len() + 1 < count {
                warn!(connection = name, node = %node_name(&self.nodes[index]), error = %error, "Broker node unreachable; trying the next");
            }
            failures.push(format!("{}: {error}", node_name(&self.nodes[index])));
        }
        Err(lapin::Error::from(std::io::Error::other(format!(
            "no broker node answered ({})",
            failures.join("; ")
        ))))
    }

    /// The first node (its user, vhost and query are every node's).
    pub fn first(&self) -> &AMQPUri {
        // `parse` never returns an empty list.
        &self.nodes[0]
    }
}

/// `host:port` of a node, for logs and errors (no credentials).
pub fn node_name(node: &AMQPUri) -> String {
    format!("{}:{}", url_host(node), node.authority.port)
}

/// A node's host as a URL writes it: an IPv6 address in brackets.
pub fn url_host(node: &AMQPUri) -> String {
    let host = &node.authority.host;
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    }
}

impl fmt::Display for BrokerAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.nodes.iter().map(node_name).collect();
        f.write_str(&names.join(","))
    }
}

/// A URL cut around its host list: `scheme://` `user:password@` `hosts` `/vhost?query`.
struct Split<'a> {
    scheme: &'a str,
    userinfo: &'a str,
    hosts: &'a str,
    rest: &'a str,
}

impl<'a> Split<'a> {
    fn of(url: &'a str) -> Option<Self> {
        let scheme_end = url.find("://")? + 3;
        let after = &url[scheme_end..];
        let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let authority = &after[..authority_end];
        // The last `@`: a password may hold a comma, never an unescaped `@`.
        let hosts_start = authority.rfind('@').map_or(0, |at| at + 1);
        Some(Self {
            scheme: &url[..scheme_end],
            userinfo: &authority[..hosts_start],
            hosts: &authority[hosts_start..],
            rest: &after[authority_end..],
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_node_is_read_as_lapin_reads_it() {
        let one = BrokerAddresses::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(one.nodes().len(), 1);
        assert_eq!(one.first().vhost, "/");
        assert_eq!(one.to_string(), "127.0.0.1:5672");
    }

    #[test]
    fn every_node_shares_the_user_vhost_and_query() {
        let url = "amqps://shop:s3cr,et@rabbit-1:5671, rabbit-2 ,[::1]:5673/orders?heartbeat=30&frame_max=65536";
        let cluster = BrokerAddresses::parse(url).unwrap();
        assert_eq!(
            cluster.to_string(),
            "rabbit-1:5671,rabbit-2:5671,[::1]:5673"
        );
        for node in cluster.nodes() {
            assert_eq!(node.authority.userinfo.username, "shop");
            assert_eq!(node.authority.userinfo.password, "s3cr,et");
            assert_eq!(node.vhost, "orders");
            assert_eq!(node.query.heartbeat, Some(30));
            assert_eq!(node.query.frame_max, Some(65536));
        }
        // A node without a port takes the scheme's.
        assert_eq!(cluster.nodes()[1].authority.port, 5671);
    }

    #[test]
    fn an_ipv6_address_is_kept_not_read_as_localhost() {
        let one = BrokerAddresses::parse("amqp://guest:guest@[::1]:5672/%2f").unwrap();
        assert_eq!(one.first().authority.host, "::1");
        assert_eq!(one.to_string(), "[::1]:5672");
    }

    #[test]
    fn a_comma_in_the_password_is_not_a_list() {
        let one = BrokerAddresses::parse("amqp://u:a,b@rabbit:5672/%2f").unwrap();
        assert_eq!(one.nodes().len(), 1);
        assert_eq!(one.first().authority.userinfo.password, "a,b");
    }

    #[test]
    fn tls_files_are_read_from_an_amqps_query_only() {
        let url = "amqps://u:p@a:5671,b/%2f?heartbeat=10&cacertfile=%2Fetc%2Fca.pem&certfile=/c.pem&keyfile=/k.pem";
        let tls = BrokerAddresses::parse(url).unwrap().tls().clone();
        assert_eq!(tls.cacertfile.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(tls.certfile.as_deref(), Some("/c.pem"));
        assert_eq!(tls.keyfile.as_deref(), Some("/k.pem"));
        let plain = BrokerAddresses::parse("amqps://u:p@a/%2f").unwrap();
        assert_eq!(plain.tls(), &TlsFiles::default());
        let refused = |url: &str| BrokerAddresses::parse(url).err().unwrap().to_string();
        // TLS files on a plain URL would let one believe it is encrypted.
        assert!(refused("amqp://u:p@a/%2f?cacertfile=/ca.pem").contains("amqps://"));
        assert!(refused("amqps://u:p@a/%2f?verify=verify_none").contains("always verified"));
        assert!(refused("amqps://u:p@a/%2f?certfile=/c.pem").contains("go together"));
        assert!(refused("amqps://u:p@a/%2f?cacertfile=").contains("empty"));
        assert!(BrokerAddresses::parse("amqps://u:p@a/%2f?verify=verify_peer").is_ok());
    }

    #[test]
    fn garbage_is_refused_with_a_reason_and_no_password() {
        let refused = |url: &str| BrokerAddresses::parse(url).err().unwrap();
        assert_eq!(
            refused("amqp://u:p@a:5672/%2f,amqp://u:p@b:5672/%2f"),
            AddressError::SeveralUrls
        );
        assert_eq!(
            refused("amqp://u:p@a:5672,,b/%2f"),
            AddressError::EmptyNode { position: 2 }
        );
        assert_eq!(
            refused("amqp://u:p@a:5672,/%2f"),
            AddressError::EmptyNode { position: 2 }
        );
        let bad_port = refused("amqp://u:secret@a:5672,b:99999/%2f");
        assert!(
            matches!(&bad_port, AddressError::BadNode { position: 2, node, .. } if node == "b:99999"),
            "{bad_port:?}"
        );
        for garbage in [
            "",
            "garbage",
            "http://a,b/",
            "amqp://u:secret@a:notaport/%2f",
        ] {
            let e = refused(garbage);
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }
}
