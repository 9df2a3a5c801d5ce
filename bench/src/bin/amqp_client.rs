//! `amqp_client`: the raw broker hop (`bench::hop`) with lapin, the
//! runtime's AMQP client, with amqprs, and with lapin publishing and
//! amqprs consuming, alternating, to compare the
//! clients' own CPU per message and what each costs the broker: flat out
//! (acks one by one and one per 32 deliveries), then offered at fixed rates
//! with each delivery acked alone, the regime of a worker at a moderate
//! load. Runs in a vhost of its own, deleted at the end.
//!
//! cargo run --release -p bench --bin amqp_client -- 20000 3

use bench::hop::{self, Hop, LapinPublishes};

const VHOST: &str = "orderflow_amqp_client_bench";
/// Seconds each paced run lasts.
const PACED_SECS: f64 = 4.0;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let pairs: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let management = bench::management(bench::MANAGEMENT);
    let amqp = bench::fresh_vhost(&management, bench::BROKER, VHOST).await?;
    let result = compare(&amqp, n, pairs).await;
    let _ = management.delete(&format!("vhosts/{VHOST}")).await;
    result
}

async fn compare(amqp: &str, n: usize, pairs: usize) -> anyhow::Result<()> {
    println!(
        "{n} messages per flat-out run, {PACED_SECS} s per paced run, {pairs} runs of each client, alternating\n"
    );
    println!("| offered | acks | client | msg/s | client µs CPU/msg | broker µs CPU/msg |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let runs = [
        (None, 1),
        (None, 32),
        (Some(500.0), 1),
        (Some(1_500.0), 1),
        (Some(5_000.0), 1),
    ];
    for (pace, ack_every) in runs {
        let offered = pace.map_or("flat out".to_owned(), |r| format!("{r:.0}/s"));
        let acks = if ack_every == 1 {
            "each".to_owned()
        } else {
            format!("one per {ack_every}")
        };
        let n = pace.map_or(n, |r| (r * PACED_SECS) as usize);
        for _ in 0..pairs {
            let row = |client: &str, hop: Hop| {
                println!(
                    "| {offered} | {acks} | {client} | {:.0} | {:.1} | {:.1} |",
                    hop.rate, hop.client_us, hop.broker_us
                );
            };
            if pace.is_none() {
                row(
                    "lapin, publishes one by one",
                    hop::with_lapin(amqp, n, ack_every, LapinPublishes::OneByOne, pace).await?,
                );
            }
            row(
                "lapin",
                hop::with_lapin(amqp, n, ack_every, LapinPublishes::Together, pace).await?,
            );
            row("amqprs", hop::with_amqprs(amqp, n, ack_every, pace).await?);
            row(
                "lapin publishing, amqprs consuming",
                hop::lapin_publishing_amqprs_consuming(amqp, n, ack_every, pace).await?,
            );
        }
    }
    Ok(())
}
