//! The SMTP sink in the benchmark's process: it accepts every email and
//! records when each order's arrived.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// When each order's email arrived, by order id.
pub type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// Starts the sink on a free loopback port; its arrivals and its port.
pub async fn start() -> anyhow::Result<(Arrivals, u16)> {
    let arrivals = Arrivals::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(smtp_sink(listener, arrivals.clone()));
    Ok((arrivals, port))
}

/// A minimal SMTP server: accepts every message and records, per order id
/// in the subject, when it arrived.
async fn smtp_sink(listener: tokio::net::TcpListener, arrivals: Arrivals) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let (read, mut write) = socket.into_split();
            let mut reader = BufReader::new(read);
            let _ = write.write_all(b"220 bench ESMTP\r\n").await;
            let mut in_data = false;
            let mut subject = String::new();
            // Replies to a pipelined group go out in one write, once the
            // group has been read.
            let mut replies: Vec<u8> = Vec::new();
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let line = line.trim_end_matches(['\r', '\n']);
                if in_data {
                    if line == "." {
                        in_data = false;
                        if let Some(id) = subject.split_whitespace().nth(1)
                            && let Ok(mut a) = arrivals.lock()
                        {
                            a.entry(id.to_owned()).or_insert_with(Instant::now);
                        }
                        subject.clear();
                        replies.extend_from_slice(b"250 OK\r\n");
                    } else if let Some(s) = line.strip_prefix("Subject: ") {
                        subject = s.to_owned();
                    }
                } else {
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250-bench\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                        "DATA" => {
                            in_data = true;
                            b"354 go ahead\r\n"
                        }
                        "QUIT" => {
                            // After the replies of the group it closes.
                            replies.extend_from_slice(b"221 bye\r\n");
                            let _ = write.write_all(&replies).await;
                            return;
                        }
                        _ => b"250 OK\r\n",
                    };
                    replies.extend_from_slice(reply);
                }
                if !replies.is_empty() && reader.buffer().is_empty() {
                    if write.write_all(&replies).await.is_err() {
                        return;
                    }
                    replies.clear();
                }
            }
        });
    }
}

/// Waits until the sink has `n` emails or `within` has passed; whether
/// they all came.
pub async fn emails_arrived(arrivals: &Arrivals, n: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if arrivals.lock().map(|a| a.len()).unwrap_or(0) >= n {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
