//! Test helpers: each test gets its own RabbitMQ vhost and PostgreSQL
//! database on the real servers, so tests run in parallel and leave nothing
//! behind. `scripts/test.sh` removes what a panicking test could not.
#![allow(clippy::unwrap_used)]

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use std::future::Future;
use std::time::{Duration, Instant};
use topology::management::{Management, encode_vhost};

pub const BROKER: &str = "127.0.0.1:5672";
pub const MANAGEMENT: &str = "http://127.0.0.1:15672";
/// RabbitMQ's TLS listener, which `scripts/services.sh` opens with a
/// certificate for `localhost` and `127.0.0.1` signed by [`BROKER_TLS_CA`].
pub const BROKER_TLS: &str = "127.0.0.1:5671";
/// The CA of the broker's TLS listener (made by `scripts/services.sh`).
pub const BROKER_TLS_CA: &str = "/etc/rabbitmq/orderflow-test-tls/ca.pem";
pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";

/// Prefix of every vhost and database a test makes.
pub const TEST_PREFIX: &str = "oftest_";

/// One test's own vhost and database.
pub struct TestEnv {
    pub vhost: String,
    pub amqp_url: String,
    pub database: String,
    pub database_url: String,
    pub management: Management,
}

impl TestEnv {
    pub async fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{TEST_PREFIX}{}", &id[..12]);
        let management = Management::new(MANAGEMENT, "guest", "guest");
        let v = encode_vhost(&name);
        management
            .put(&format!("vhosts/{v}"), &json!({}))
            .await
            .unwrap();
        management
            .put(
                &format!("permissions/{v}/guest"),
                &json!({"configure": ".*", "write": ".*", "read": ".*"}),
            )
            .await
            .unwrap();
        let admin = admin_pool().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        Self {
            amqp_url: format!("amqp://guest:guest@{BROKER}/{name}"),
            database_url: format!("{POSTGRES}/{name}"),
            vhost: name.clone(),
            database: name,
            management,
        }
    }

    /// Removes the vhost (with its queues) and the database.
    pub async fn cleanup(self) {
        let _ = self
            .management
            .delete(&format!("vhosts/{}", encode_vhost(&self.vhost)))
            .await;
        let admin = admin_pool().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.database
        )))
        .execute(&admin)
        .await;
        admin.close().await;
    }

    /// This test's vhost over TLS (`amqps://`), trusting the listener's CA.
    pub fn amqps_url(&self) -> String {
        assert!(
            std::path::Path::new(BROKER_TLS_CA).exists(),
            "{BROKER_TLS_CA} is missing: run scripts/services.sh, which opens the broker's TLS listener"
        );
        let url = self
            .amqp_url
            .replacen("amqp://", "amqps://", 1)
            .replacen(BROKER, BROKER_TLS, 1);
        format!("{url}?cacertfile={BROKER_TLS_CA}")
    }

    /// This test's `AMQP_URL` naming `nodes` (`host:port` each) in place of
    /// the broker: a cluster's nodes, as the processes under test see them.
    pub fn amqp_url_with_nodes(&self, nodes: &[String]) -> String {
        let url = self.amqp_url.replacen(BROKER, &nodes.join(","), 1);
        assert_ne!(url, self.amqp_url, "no broker address to replace");
        url
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&self.database_url)
            .await
            .unwrap()
    }

    /// Declares the contract topology with `retry_delays` as its retry
    /// tiers, as `topology apply` does before a deployment.
    pub async fn declare_topology(&self, retry_delays: &str) {
        let topology = topology::Topology::contract(&retry_delays.parse().unwrap());
        let conn = self.connection().await;
        assert!(
            topology::declare(&conn, &topology)
                .await
                .unwrap()
                .is_empty()
        );
        let _ = conn.close(200, "done".into()).await;
    }

    pub async fn connection(&self) -> Connection {
        Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .unwrap()
    }

    /// Publishes with a confirm, whatever the properties and body.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
    ) {
        let conn = self.connection().await;
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "publish not confirmed");
        assert!(
            confirm.take_message().is_none(),
            "unroutable: {exchange} {routing_key}"
        );
        let _ = conn.close(200, "done".into()).await;
    }

    /// Messages ready in `queue`.
    pub async fn depth(&self, queue: &str) -> u32 {
        let conn = self.connection().await;
        let channel = conn.create_channel().await.unwrap();
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = conn.close(200, "done".into()).await;
        q.message_count()
    }

    /// Takes every message out of `queue` (acking them).
    pub async fn drain(&self, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
        let conn = self.connection().await;
        let channel = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push((m.delivery.properties.clone(), m.delivery.data.clone()));
        }
        let _ = conn.close(200, "done".into()).await;
        out
    }

    /// The client connections of this vhost, as the management API lists
    /// them.
    async fn connections(
        &self,
    ) -> Result<Vec<serde_json::Value>, topology::management::ManagementError> {
        let v = encode_vhost(&self.vhost);
        let conns = self
            .management
            .get(&format!("vhosts/{v}/connections"))
            .await?;
        Ok(conns.as_array().cloned().unwrap_or_default())
    }

    /// Each client connection of this vhost the management API lists, by
    /// name, with the `frame_max` it agreed with the broker (none while the
    /// API does not answer: callers poll).
    pub async fn frame_max_by_connection(&self) -> Vec<(String, u64)> {
        self.connections()
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|c| Some((connection_name(c)?.to_owned(), c["frame_max"].as_u64()?)))
            .collect()
    }

    /// Force-closes every client connection of this vhost whose name starts
    /// with `name_prefix`, as a network cut would.
    pub async fn close_connections(&self, name_prefix: &str) -> usize {
        let mut closed = 0;
        for c in self.connections().await.unwrap() {
            if connection_name(&c)
                .unwrap_or_default()
                .starts_with(name_prefix)
            {
                let name = c["name"].as_str().unwrap_or_default();
                if self
                    .management
                    .delete(&format!("connections/{}", encode_vhost(name)))
                    .await
                    .is_ok()
                {
                    closed += 1;
                }
            }
        }
        closed
    }
}

/// The name a client gave its connection (`connection_name`), as the
/// management UI shows it.
fn connection_name(connection: &serde_json::Value) -> Option<&str> {
    connection["client_properties"]["connection_name"].as_str()
}

/// Drops the PostgreSQL roles a test made, once the databases they hold
/// grants in are gone (a role with grants cannot be dropped).
pub async fn drop_database_roles(names: &[String]) {
    let admin = admin_pool().await;
    for name in names {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {quoted}")))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
}

async fn admin_pool() -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{POSTGRES}/postgres"))
        .await
        .unwrap()
}

/// Polls `condition` until it holds or `timeout` passes; panics with `what`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback port nothing listens on right now (the OS's choice).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP forwarder from a loopback port of its own to `target`: an address
/// of a server that a test can take away. [`Forwarder::cut`] closes the
/// port and every connection through it, as a node that goes down does.
pub struct Forwarder {
    pub port: u16,
    accepting: tokio::task::JoinHandle<()>,
    connections: std::sync::Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    carried: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Forwarder {
    /// Forwards from a port the OS chooses.
    pub async fn start(target: &str) -> Self {
        Self::on(0, target).await
    }

    /// Forwards from `port` on loopback.
    pub async fn on(port: u16, target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = std::sync::Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let carried = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let target = target.to_owned();
        let accepting = tokio::spawn({
            let connections = connections.clone();
            let carried = carried.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    carried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let target = target.clone();
                    connections.lock().unwrap().spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            }
        });
        Self {
            port,
            accepting,
            connections,
            carried,
        }
    }

    /// How many connections it has accepted so far.
    pub fn carried(&self) -> usize {
        self.carried.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes every connection through it and goes on accepting new
    /// ones, as a server restarted at the same address.
    pub fn drop_connections(&self) {
        if let Ok(mut connections) = self.connections.lock() {
            connections.abort_all();
        }
    }

    /// Closes the port and every connection through it.
    pub fn cut(self) {
        drop(self);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.accepting.abort();
        self.drop_connections();
    }
}

/// A broker memory alarm for as long as it lives: the broker's memory
/// watermark lowered until every publishing connection is blocked, and put
/// back on drop, however the test ends. It blocks every publisher of the
/// shared broker, so only tests in the serial group (`scripts/test.sh`,
/// binaries named `broker_alarm`) raise one.
pub struct MemoryAlarm {
    was: String,
}

impl MemoryAlarm {
    pub fn raise() -> Self {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
            .output()
            .unwrap();
        let was = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let was = if was.parse::<f64>().is_ok() {
            was
        } else {
            "0.4".to_owned()
        };
        set_memory_watermark("0.0001");
        Self { was }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        set_memory_watermark(&self.was);
    }
}

fn set_memory_watermark(fraction: &str) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(["set_vm_memory_high_watermark", fraction])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "rabbitmqctl set_vm_memory_high_watermark {fraction}"
    );
}

/// Starts `binary` with `name=value` and asserts that it refuses the value
/// at start: it exits non-zero, naming the variable and the value. Nothing
/// listens at the broker and database addresses it is given, so a binary
/// that accepted the value would keep retrying them instead of exiting
/// (caught by a timeout) or fail later with another message.
pub async fn assert_setting_refused(binary: &str, name: &str, value: &str) {
    let run = tokio::process::Command::new(binary)
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("RUST_LOG", "off")
        .env(name, value)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("{name}={value} was accepted: {binary} kept running"))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{name}={value} was accepted");
    // Every binary refuses every variable in the same words.
    let refusal = format!("{name}={value:?} is not valid: ");
    assert!(stderr.contains(&refusal), "{name}={value}: {stderr}");
}

/// The real SMTP server process of the tests (`scripts/smtp_sink.py`) on a
/// port of its own, recording each accepted mail as a JSON line.
pub struct SmtpSink {
    pub port: u16,
    record: std::path::PathBuf,
    options: SmtpOptions,
    child: Option<tokio::process::Child>,
}

/// How the test SMTP server answers.
#[derive(Debug, Clone, Default)]
pub struct SmtpOptions {
    /// Refuse for good (550) every recipient whose address contains this,
    /// as a mail server refuses an unknown user.
    pub refuse: Option<String>,
    /// Offer PIPELINING (RFC 2920), as Postfix and the big relays do.
    pub pipelining: bool,
    /// Speak TLS from the first byte (`smtps://`) with this certificate.
    pub tls: Option<TestCertificate>,
}

/// A server certificate for `localhost` and `127.0.0.1`, issued by a CA
/// made for it, as PEM files in a directory of their own.
#[derive(Debug, Clone)]
pub struct TestCertificate {
    /// The CA a client must trust.
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl TestCertificate {
    /// Makes a CA and a certificate it signs, with `openssl`, under the
    /// temporary directory in `name`.
    pub fn make(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{name}-tls"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = |file: &str| dir.join(file).to_string_lossy().into_owned();
        std::fs::write(
            path("leaf.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=orderflow test CA",
            "-keyout",
            &path("ca.key"),
            "-out",
            &path("ca.pem"),
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &path("leaf.key"),
            "-out",
            &path("leaf.csr"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &path("leaf.csr"),
            "-CA",
            &path("ca.pem"),
            "-CAkey",
            &path("ca.key"),
            "-CAcreateserial",
            "-extfile",
            &path("leaf.ext"),
            "-out",
            &path("leaf.pem"),
        ]);
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("leaf.pem"),
            key: dir.join("leaf.key"),
        }
    }

    /// Removes its files.
    pub fn remove(self) {
        if let Some(dir) = self.ca.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl SmtpSink {
    /// Starts a sink that accepts every mail and offers PIPELINING; `name`
    /// (a test's database, say) names its record file.
    pub async fn start(name: &str) -> Self {
        let options = SmtpOptions {
            pipelining: true,
            ..SmtpOptions::default()
        };
        Self::start_with(name, options).await
    }

    /// Starts a sink that answers as `options` say.
    pub async fn start_with(name: &str, options: SmtpOptions) -> Self {
        let port = free_port();
        let record = std::env::temp_dir().join(format!("{name}-mail.jsonl"));
        let _ = std::fs::remove_file(&record);
        let mut sink = Self {
            port,
            record,
            options,
            child: None,
        };
        sink.restart().await;
        sink
    }

    /// `smtp://127.0.0.1:PORT`, or `smtps://localhost:PORT` with TLS.
    pub fn url(&self) -> String {
        match self.options.tls {
            None => format!("smtp://127.0.0.1:{}", self.port),
            Some(_) => format!("smtps://localhost:{}", self.port),
        }
    }

    /// Starts the process (again), on the same port and record.
    pub async fn restart(&mut self) {
        let script =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/smtp_sink.py");
        let mut command = tokio::process::Command::new("python3");
        command
            .arg(script)
            .args(["--port", &self.port.to_string()])
            .arg("--record")
            .arg(&self.record);
        if let Some(refuse) = &self.options.refuse {
            command.args(["--refuse", refuse]);
        }
        if self.options.pipelining {
            command.arg("--pipelining");
        }
        if let Some(tls) = &self.options.tls {
            command.arg("--tls-cert").arg(&tls.cert);
            command.arg("--tls-key").arg(&tls.key);
        }
        let child = command
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        eventually(
            Duration::from_secs(20),
            "the SMTP server listens",
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// Stops the process, as an outage would.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Every mail it accepted.
    pub fn mails(&self) -> Vec<serde_json::Value> {
        self.records()
            .into_iter()
            .filter(|r| r.get("refused").is_none())
            .collect()
    }

    /// The address of every recipient it refused, once per refusal.
    pub fn refusals(&self) -> Vec<String> {
        self.records()
            .into_iter()
            .filter_map(|r| r.get("refused")?.as_str().map(str::to_owned))
            .collect()
    }

    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Stops the process and removes its record.
    pub async fn remove(mut self) {
        self.stop().await;
        let _ = std::fs::remove_file(&self.record);
    }
}
