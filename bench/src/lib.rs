//! What the benchmarks share: reading a process's CPU time, and the raw
//! broker hop (persistent messages through a quorum queue, publisher
//! confirms, manual acks) measured with either AMQP client.

pub mod hop;

/// The local broker's AMQP address.
pub const BROKER: &str = "127.0.0.1:5672";
/// The local broker's management API.
pub const MANAGEMENT: &str = "http://127.0.0.1:15672";

/// A broker's management API, as the guest user.
pub fn management(url: &str) -> topology::Management {
    topology::Management::new(url, "guest", "guest")
}

/// Creates `vhost` afresh (deleting what an earlier run left in it), lets
/// guest do everything in it, and returns its AMQP URL at `broker`
/// (`host:port`).
pub async fn fresh_vhost(
    management: &topology::Management,
    broker: &str,
    vhost: &str,
) -> anyhow::Result<String> {
    let _ = management.delete(&format!("vhosts/{vhost}")).await;
    management
        .put(&format!("vhosts/{vhost}"), &serde_json::json!({}))
        .await?;
    management
        .put(
            &format!("permissions/{vhost}/guest"),
            &serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}),
        )
        .await?;
    Ok(format!("amqp://guest:guest@{broker}/{vhost}"))
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// CPU seconds of every process whose command line contains `needle`.
pub fn cpu_of_all(needle: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .map(cpu_seconds)
        .sum()
}
