//! The SMTP client: lettre's protocol over pooled connections that send
//! each command at once.
//!
//! lettre 0.11 leaves Nagle's algorithm on. It writes a message body and
//! its final `.` line separately, so the `.` waits for the server's delayed
//! ACK: about 40 ms per email on Linux, which capped a worker at ~25
//! emails per connection per second. Plain and STARTTLS connections are
//! therefore opened here with `TCP_NODELAY` and handed to lettre's
//! connection; and an ASCII email (every one this worker builds) goes out
//! with its content and final dot in one write, so no write here ever
//! follows another without a reply between, which is all Nagle's algorithm
//! waits on. That also covers `smtps://` (implicit TLS), whose connection
//! lettre opens itself.
//!
//! lettre also waits for the reply to each command. Where the server offers
//! PIPELINING (RFC 2920; Postfix, Exim, the big relays do), `MAIL`, `RCPT`
//! and `DATA` go out in one write and the content with its final dot in
//! another: two round trips per email instead of four, which is half the
//! time to a relay across a network (decision 0016).

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
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
    host: String,
    port: u16,
    hello: ClientId,
    tls: Tls,
    credentials: Option<Credentials>,
    timeout: Duration,
    idle: Mutex<Vec<(Session, Instant)>>,
}

/// An open connection and what its server offers that lettre does not
/// track.
struct Session {
    connection: AsyncSmtpConnection,
    pipelining: bool,
}

enum Tls {
    Never,
    /// `smtps://`: TLS from the first byte.
    Implicit(TlsParameters),
    /// `?tls=opportunistic`: STARTTLS if the server offers it.
    StartTlsIfOffered(TlsParameters),
    /// `?tls=required`: STARTTLS or no session.
    StartTlsRequired(TlsParameters),
}

impl Mailer {
    /// From a URL in lettre's form: `smtp://[user:password@]host[:port][/ehlo-name][?tls=required|opportunistic]`
    /// or `smtps://…` for implicit TLS.
    pub fn from_url(raw: &str, timeout: Duration) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
        let implicit = match url.scheme() {
            "smtp" => false,
            "smtps" => true,
            other => return Err(format!("unknown scheme {other:?} (smtp or smtps)")),
        };
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
        let (tls, default_port) = match tls.as_deref() {
            // As in lettre's form, `tls=` means nothing to `smtps://`.
            _ if implicit => (Tls::Implicit(params()?), 465),
            None => (Tls::Never, 25),
            Some("required") => (Tls::StartTlsRequired(params()?), 587),
            Some("opportunistic") => (Tls::StartTlsIfOffered(params()?), 587),
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
            port: url.port().unwrap_or(default_port),
            host,
            hello,
            tls,
            credentials,
            timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Hands one email to the server.
    pub async fn send(&self, envelope: &Envelope, email: &[u8]) -> Result<(), SendError> {
        let mut session = match self.pooled().await {
            Some(c) => c,
            None => tokio::time::timeout(self.timeout, self.connect())
                .await
                .map_err(|_| SendError::Unavailable("connecting timed out".into()))??,
        };
        let connection = &mut session.connection;
        let sent = tokio::time::timeout(self.timeout, async {
            // Non-ASCII needs the MAIL parameters lettre chooses and checks.
            if email.is_ascii() && ascii_addresses(envelope) {
                send_ascii(connection, session.pipelining, envelope, email).await
            } else {
                connection.send(envelope, email).await
            }
        })
        .await;
        match sent {
            Ok(Ok(_)) => {
                let mut idle = self.idle.lock().await;
                if idle.len() < MAX_IDLE {
                    idle.push((session, Instant::now()));
                }
                Ok(())
            }
            Ok(Err(e)) => {
                if !session.connection.has_broken() && e.is_permanent() {
                    // A refusal of this email; the session itself is fine.
                    self.idle.lock().await.push((session, Instant::now()));
                }
                Err(e.into())
            }
            Err(_) => Err(SendError::Unavailable("sending timed out".into())),
        }
    }

    /// An idle connection that still answers, if there is one.
    async fn pooled(&self) -> Option<Session> {
        loop {
            let (mut session, since) = self.idle.lock().await.pop()?;
            if since.elapsed() < TRUST_IDLE {
                return Some(session);
            }
            let alive =
                tokio::time::timeout(self.timeout, session.connection.test_connected()).await;
            if alive == Ok(true) {
                return Some(session);
            }
        }
    }

    async fn connect(&self) -> Result<Session, SendError> {
        let mut connection = match &self.tls {
            // lettre's own socket, without `TCP_NODELAY`: `send_ascii`
            // never writes twice without a reply between.
            Tls::Implicit(params) => {
                AsyncSmtpConnection::connect_tokio1(
                    (self.host.as_str(), self.port),
                    Some(self.timeout),
                    &self.hello,
                    Some(params.clone()),
                    None,
                )
                .await?
            }
            _ => {
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
                AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello).await?
            }
        };
        match &self.tls {
            Tls::Never | Tls::Implicit(_) => {}
            Tls::StartTlsIfOffered(params) => {
                if connection.can_starttls() {
                    connection.starttls(params.clone(), &self.hello).await?;
                }
            }
            Tls::StartTlsRequired(params) => {
                if !connection.can_starttls() {
                    return Err(SendError::Unavailable(
                        "the server does not offer STARTTLS, which tls=required demands".into(),
                    ));
                }
                connection.starttls(params.clone(), &self.hello).await?;
            }
        }
        // lettre keeps only the extensions it uses from its own EHLO; one
        // more tells whether the server takes pipelined commands. Before
        // AUTH, since a new EHLO starts the session over. A server that
        // refuses a second EHLO keeps the session of the first, without
        // pipelining.
        let pipelining = match connection.command(Ehlo::new(self.hello.clone())).await {
            Ok(offered) => offers_pipelining(&offered),
            Err(e) if e.is_permanent() => false,
            Err(e) => return Err(e.into()),
        };
        if let Some(credentials) = &self.credentials {
            connection
                .auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(Session {
            connection,
            pipelining,
        })
    }
}

/// Whether an EHLO reply lists PIPELINING.
fn offers_pipelining(ehlo: &Response) -> bool {
    ehlo.message()
        .any(|line| line.split_whitespace().next() == Some("PIPELINING"))
}

fn ascii_addresses(envelope: &Envelope) -> bool {
    envelope
        .to()
        .iter()
        .chain(envelope.from())
        .all(|address| AsRef::<str>::as_ref(address).is_ascii())
}

/// One ASCII email: `MAIL`, each `RCPT` and `DATA`, in one write with
/// their replies read in order where the server takes pipelined commands
/// (RFC 2920: two round trips per email), else one by one; then the
/// content and its final dot in one write. The first refusal is the
/// answer: pipelined commands after it fail only because of it (no `DATA`
/// without a recipient). A session that refused anything is closed, as
/// lettre's own `send` does, since a server may have taken `DATA` after
/// refusing every recipient.
async fn send_ascii(
    connection: &mut AsyncSmtpConnection,
    pipelining: bool,
    envelope: &Envelope,
    email: &[u8],
) -> Result<Response, lettre::transport::smtp::Error> {
    let mut commands = vec![Mail::new(envelope.from().cloned(), vec![]).to_string()];
    commands.extend(
        envelope
            .to()
            .iter()
            .map(|to| Rcpt::new(to.clone(), vec![]).to_string()),
    );
    commands.push(Data.to_string());
    let mut refused = None;
    if pipelining {
        refused = connection.command(commands.concat()).await.err();
        for _ in 1..commands.len() {
            if let Err(e) = connection.read_response().await {
                refused.get_or_insert(e);
            }
        }
    } else {
        for command in commands {
            if let Err(e) = connection.command(command).await {
                refused = Some(e);
                break;
            }
        }
    }
    if let Some(e) = refused {
        connection.abort().await;
        return Err(e);
    }
    match String::from_utf8(transparent(email)) {
        Ok(content) => connection.command(content).await,
        // Not reached: the caller sends only ASCII this way.
        Err(_) => connection.message(email).await,
    }
}

/// The content of `DATA` as sent: a dot doubled at the start of each line
/// (RFC 5321 4.5.2, as lettre does), then the line that ends it, after the
/// content's own last line break (lettre adds one more, an empty line).
fn transparent(email: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(email.len() + 8);
    let mut line_start = true;
    for &b in email {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n' && out.len() >= 2 && out[out.len() - 2] == b'\r';
    }
    if !(out.is_empty() || out.ends_with(b"\r\n")) {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
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
#[allow(clippy::unwrap_used)]
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

    #[test]
    fn content_has_each_leading_dot_doubled_and_ends_with_a_dot_line() {
        assert_eq!(
            transparent(b".first\r\nmid.dle\r\n..two\r\n\r.not a line start\r\nend"),
            b"..first\r\nmid.dle\r\n...two\r\n\r.not a line start\r\nend\r\n.\r\n"
        );
        assert_eq!(transparent(b""), b".\r\n");
        assert_eq!(transparent(b"last line\r\n"), b"last line\r\n.\r\n");
    }

    /// A one-email SMTP server that offers PIPELINING and answers nothing of
    /// `MAIL`, `RCPT` and `DATA` until all three have come (a client that
    /// waits for each reply hangs here and times out); it answers them with
    /// `group`, reads the content if `DATA` was taken, and returns all it
    /// read after the EHLOs.
    async fn pipelining_server(listener: tokio::net::TcpListener, group: [&str; 3]) -> String {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (socket, _) = listener.accept().await.unwrap();
        let (read, mut write) = socket.into_split();
        let mut read = BufReader::new(read);
        write.write_all(b"220 scripted ESMTP\r\n").await.unwrap();
        let mut line = String::new();
        // lettre's EHLO, then the mailer's own.
        for _ in 0..2 {
            line.clear();
            read.read_line(&mut line).await.unwrap();
            assert!(line.starts_with("EHLO "), "{line:?}");
            write
                .write_all(b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                .await
                .unwrap();
        }
        let mut seen = String::new();
        for _ in 0..3 {
            read.read_line(&mut seen).await.unwrap();
        }
        write.write_all(group.concat().as_bytes()).await.unwrap();
        if group[2].starts_with("354") {
            loop {
                line.clear();
                read.read_line(&mut line).await.unwrap();
                seen.push_str(&line);
                if line == ".\r\n" || line.is_empty() {
                    break;
                }
            }
            write.write_all(b"250 2.0.0 queued\r\n").await.unwrap();
        }
        seen
    }

    /// From orders@orderflow.local to ann@example.com.
    fn envelope() -> Envelope {
        Envelope::new(
            Some("orders@orderflow.local".parse().unwrap()),
            vec!["ann@example.com".parse().unwrap()],
        )
        .unwrap()
    }

    /// `email` through the server on `port`.
    async fn send_to(port: u16, email: &[u8]) -> Result<(), SendError> {
        let mailer =
            Mailer::from_url(&format!("smtp://127.0.0.1:{port}"), Duration::from_secs(5)).unwrap();
        mailer.send(&envelope(), email).await
    }

    async fn send_one(group: [&'static str; 3]) -> (Result<(), SendError>, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(pipelining_server(listener, group));
        let sent = send_to(port, b"Subject: hi\r\n\r\n.a line with a dot\r\n").await;
        (sent, server.await.unwrap())
    }

    #[tokio::test]
    async fn mail_rcpt_and_data_go_out_together_to_a_server_that_offers_pipelining() {
        let (sent, seen) = send_one(["250 2.1.0 ok\r\n", "250 2.1.5 ok\r\n", "354 go\r\n"]).await;
        assert!(sent.is_ok(), "{sent:?}");
        assert_eq!(
            seen,
            "MAIL FROM:<orders@orderflow.local>\r\nRCPT TO:<ann@example.com>\r\nDATA\r\n\
             Subject: hi\r\n\r\n..a line with a dot\r\n.\r\n"
        );
    }

    #[tokio::test]
    async fn a_server_that_refuses_a_second_ehlo_gets_one_command_at_a_time() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let (read, mut write) = socket.into_split();
            let mut read = BufReader::new(read);
            write.write_all(b"220 scripted ESMTP\r\n").await.unwrap();
            let script: [(&str, &[u8]); 5] = [
                (
                    "EHLO ",
                    b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                ),
                ("EHLO ", b"502 5.5.1 once is enough\r\n"),
                ("MAIL FROM:", b"250 ok\r\n"),
                ("RCPT TO:", b"250 ok\r\n"),
                ("DATA", b"354 go\r\n"),
            ];
            for (expected, reply) in script {
                let mut line = String::new();
                read.read_line(&mut line).await.unwrap();
                assert!(line.starts_with(expected), "{line:?}, not {expected:?}");
                // One command at a time: nothing more has come.
                assert!(read.buffer().is_empty(), "pipelined after {line:?}");
                write.write_all(reply).await.unwrap();
            }
            let mut line = String::new();
            while line != ".\r\n" {
                line.clear();
                assert!(read.read_line(&mut line).await.unwrap() > 0);
            }
            write.write_all(b"250 queued\r\n").await.unwrap();
        });
        let sent = send_to(port, b"Subject: hi\r\n\r\nhello\r\n").await;
        assert!(sent.is_ok(), "{sent:?}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn smtps_sends_pipelined_over_implicit_tls_to_a_real_server() {
        use lettre::transport::smtp::client::Certificate;
        let name = format!("smtps-{}", uuid::Uuid::new_v4().simple());
        let certificate = testkit::TestCertificate::make(&name);
        for pipelining in [true, false] {
            let options = testkit::SmtpOptions {
                pipelining,
                tls: Some(certificate.clone()),
                ..testkit::SmtpOptions::default()
            };
            let sink = testkit::SmtpSink::start_with(&name, options).await;
            let mut mailer = Mailer::from_url(&sink.url(), Duration::from_secs(5)).unwrap();
            assert!(matches!(mailer.tls, Tls::Implicit(_)));
            // The same parameters, trusting the test CA besides the web's.
            let ca = std::fs::read(&certificate.ca).unwrap();
            mailer.tls = Tls::Implicit(
                TlsParameters::builder("localhost".into())
                    .add_root_certificate(Certificate::from_pem(&ca).unwrap())
                    .build()
                    .unwrap(),
            );
            let envelope = envelope();
            for i in 0..2 {
                let email = format!("Subject: over TLS {i}\r\n\r\n.dotted\r\n");
                let sent = mailer.send(&envelope, email.as_bytes()).await;
                assert!(sent.is_ok(), "pipelining {pipelining}: {sent:?}");
            }
            let mails = sink.mails();
            let subjects: Vec<&str> = mails.iter().filter_map(|m| m["subject"].as_str()).collect();
            assert_eq!(
                subjects,
                ["over TLS 0", "over TLS 1"],
                "pipelining {pipelining}"
            );
            assert_eq!(mails[0]["text"], ".dotted\r\n");
            sink.remove().await;
        }
        certificate.remove();
    }

    #[tokio::test]
    async fn in_a_pipelined_group_the_first_refusal_is_the_answer() {
        // The recipient refused for good: DATA then fails only for want of
        // one, and the email is refused, not retried.
        let (sent, _) = send_one([
            "250 2.1.0 ok\r\n",
            "550 5.1.1 no such user\r\n",
            "503 5.5.1 no valid recipients\r\n",
        ])
        .await;
        assert!(
            matches!(&sent, Err(SendError::Refused(e)) if e.contains("no such user")),
            "{sent:?}"
        );
        // The sender refused for now: unavailable, whatever follows.
        let (sent, _) = send_one([
            "451 4.3.0 try later\r\n",
            "503 5.5.1 need MAIL\r\n",
            "503 5.5.1 need RCPT\r\n",
        ])
        .await;
        assert!(
            matches!(&sent, Err(SendError::Unavailable(e)) if e.contains("try later")),
            "{sent:?}"
        );
    }
}
