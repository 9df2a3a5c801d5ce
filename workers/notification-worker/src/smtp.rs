//! The SMTP client: lettre's protocol over pooled connections that send
//! each command at once.
//!
//! lettre 0.11 leaves Nagle's algorithm on. It writes a message body and
//! its final `.` line separately, so the `.` waits for the server's delayed
//! ACK: about 40 ms per email on Linux, which capped a worker at ~25
//! emails per connection per second. Plain and STARTTLS connections are
//! therefore opened here with `TCP_NODELAY` and handed to lettre's
//! connection; `smtps://` (implicit TLS) still goes through lettre's own
//! transport.

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Why an email was not handed over.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The server refused it for good (5xx): retrying cannot help.
    #[error("SMTP refused the email: {0}")]
    Refused(String),
    /// The server is away, slow or said "later" (4xx).
    #[error("SMTP unavailable: {0}")]
    Unavailable(String),
}

impl From<lettre::transport::smtp::Error> for SendError {
    fn from(e: lettre::transport::smtp::Error) -> Self {
        if e.is_permanent() {
            Self::Refused(e.to_string())
        } else {
            Self::Unavailable(e.to_string())
        }
    }
}

/// How long an idle pooled connection is trusted without a `NOOP` first.
const TRUST_IDLE: Duration = Duration::from_secs(5);
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 16;

pub struct Mailer {
    inner: Inner,
}

enum Inner {
    Direct(Box<Direct>),
    /// `smtps://`: lettre's transport, pool and TLS wrapper.
    Lettre(AsyncSmtpTransport<Tokio1Executor>),
}

struct Direct {
    host: String,
    port: u16,
    hello: ClientId,
    starttls: StartTls,
    credentials: Option<Credentials>,
    timeout: Duration,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
}

enum StartTls {
    Never,
    IfOffered(TlsParameters),
    Required(TlsParameters),
}

impl Mailer {
    /// From a URL in lettre's form: `smtp://[user:password@]host[:port][/ehlo-name][?tls=required|opportunistic]`
    /// or `smtps://…` for implicit TLS.
    pub fn from_url(raw: &str, timeout: Duration) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
        if url.scheme() == "smtps" {
            let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(raw)
                .map_err(|e| e.to_string())?
                .timeout(Some(timeout))
                .build();
            return Ok(Self {
                inner: Inner::Lettre(transport),
            });
        }
        if url.scheme() != "smtp" {
            return Err(format!("unknown scheme {:?} (smtp or smtps)", url.scheme()));
        }
        let host = url
            .host_str()
            .ok_or("no host")?
            .trim_matches(['[', ']'])
            .to_owned();
        let tls = url
            .query_pairs()
            .find(|(k, _)| k == "tls")
            .map(|(_, v)| v.into_owned());
        let params = || TlsParameters::new(host.clone()).map_err(|e| e.to_string());
        let (starttls, default_port) = match tls.as_deref() {
            None => (StartTls::Never, 25),
            Some("required") => (StartTls::Required(params()?), 587),
            Some("opportunistic") => (StartTls::IfOffered(params()?), 587),
            Some(other) => {
                return Err(format!(
                    "tls={other:?} is not one of required, opportunistic"
                ));
            }
        };
        let decode = |s: &str| {
            percent_decode(s).ok_or_else(|| format!("{s:?} is not valid percent-encoding"))
        };
        let credentials = match url.password() {
            Some(password) => Some(Credentials::new(decode(url.username())?, decode(password)?)),
            None => None,
        };
        let name = url.path().trim_matches('/');
        let hello = if name.is_empty() {
            ClientId::default()
        } else {
            ClientId::Domain(name.to_owned())
        };
        Ok(Self {
            inner: Inner::Direct(Box::new(Direct {
                port: url.port().unwrap_or(default_port),
                host,
                hello,
                starttls,
                credentials,
                timeout,
                idle: Mutex::new(Vec::new()),
            })),
        })
    }

    /// Hands one email to the server.
    pub async fn send(&self, envelope: &Envelope, email: &[u8]) -> Result<(), SendError> {
        match &self.inner {
            Inner::Lettre(transport) => transport
                .send_raw(envelope, email)
                .await
                .map(drop)
                .map_err(SendError::from),
            Inner::Direct(direct) => direct.send(envelope, email).await,
        }
    }
}

impl Direct {
    async fn send(&self, envelope: &Envelope, email: &[u8]) -> Result<(), SendError> {
        let mut connection = match self.pooled().await {
            Some(c) => c,
            None => tokio::time::timeout(self.timeout, self.connect())
                .await
                .map_err(|_| SendError::Unavailable("connecting timed out".into()))??,
        };
        let sent = tokio::time::timeout(self.timeout, connection.send(envelope, email)).await;
        match sent {
            Ok(Ok(_)) => {
                let mut idle = self.idle.lock().await;
                if idle.len() < MAX_IDLE {
                    idle.push((connection, Instant::now()));
                }
                Ok(())
            }
            Ok(Err(e)) => {
                if !connection.has_broken() && e.is_permanent() {
                    // A refusal of this email; the session itself is fine.
                    self.idle.lock().await.push((connection, Instant::now()));
                }
                Err(e.into())
            }
            Err(_) => Err(SendError::Unavailable("sending timed out".into())),
        }
    }

    /// An idle connection that still answers, if there is one.
    async fn pooled(&self) -> Option<AsyncSmtpConnection> {
        loop {
            let (mut connection, since) = self.idle.lock().await.pop()?;
            if since.elapsed() < TRUST_IDLE {
                return Some(connection);
            }
            let alive = tokio::time::timeout(self.timeout, connection.test_connected()).await;
            if alive == Ok(true) {
                return Some(connection);
            }
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                SendError::Unavailable(format!(
                    "cannot connect to {}:{}: {e}",
                    self.host, self.port
                ))
            })?;
        stream
            .set_nodelay(true)
            .map_err(|e| SendError::Unavailable(e.to_string()))?;
        let mut connection =
            AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello).await?;
        match &self.starttls {
            StartTls::Never => {}
            StartTls::IfOffered(params) => {
                if connection.can_starttls() {
                    connection.starttls(params.clone(), &self.hello).await?;
                }
            }
            StartTls::Required(params) => {
                if !connection.can_starttls() {
                    return Err(SendError::Unavailable(
                        "the server does not offer STARTTLS, which tls=required demands".into(),
                    ));
                }
                connection.starttls(params.clone(), &self.hello).await?;
            }
        }
        if let Some(credentials) = &self.credentials {
            connection
                .auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(connection)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // lettre's `smtps://` transport starts its pool on the runtime.
    #[tokio::test]
    async fn urls_in_lettres_form_are_understood_and_garbage_is_refused() {
        let t = Duration::from_secs(1);
        for good in [
            "smtp://127.0.0.1:1025",
            "smtp://mail.example.com",
            "smtp://user:p%40ss@mail.example.com:2525/orderflow.example?tls=required",
            "smtp://mail.example.com?tls=opportunistic",
            "smtps://user:pw@mail.example.com",
        ] {
            assert!(Mailer::from_url(good, t).is_ok(), "{good}");
        }
        for bad in [
            "not a url",
            "http://mail.example.com",
            "smtp://mail.example.com?tls=maybe",
            "smtp://user:%zz@mail.example.com",
        ] {
            assert!(Mailer::from_url(bad, t).is_err(), "{bad}");
        }
        assert_eq!(percent_decode("p%40ss").as_deref(), Some("p@ss"));
    }
}
