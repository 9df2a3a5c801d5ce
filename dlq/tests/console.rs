//! The failed-message console (`dlq serve`) in a real headless Chromium,
//! driven through chromedriver, against the real broker and database: an
//! operator signs in, sees why a charge died, replays it with a
//! confirmation step (from the keyboard), and the order completes, charged
//! once, with the operator's name in the audit trail. Its screenshots are
//! checked, on a desktop and on a phone's width.
#![allow(clippy::unwrap_used)]

use dlq::Dlq;
use dlq::console::Console;
use e2e::System;
use fantoccini::{Client, ClientBuilder, Locator, key::Key};
use payment_gateway_sim::Trouble;
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use testkit::eventually;
use tokio::sync::oneshot;

/// chromedriver on a port of its own, ended with the test.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Self {
        let port = testkit::free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is missing: scripts/services.sh installs chromium-driver");
        let url = format!("http://127.0.0.1:{port}");
        eventually(
            Duration::from_secs(20),
            "chromedriver listening",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        Self { child, url }
    }

    /// A headless Chromium of `width` × `height`.
    async fn browser(&self, width: u32, height: u32) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", format!("--window-size={width},{height}")],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .unwrap()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The console on a free port, serving `system`'s broker and database.
async fn console(system: &System) -> (String, oneshot::Sender<()>) {
    let dlq = Dlq::connect(&system.env.amqp_url, &system.env.database_url, "console")
        .await
        .unwrap();
    let console = Console {
        dlq,
        authenticator: publisher::auth::Authenticator::start(e2e::test_keys())
            .await
            .unwrap(),
        inbox_retention: Duration::from_secs(30 * 86_400),
        max_replays: dlq::DEFAULT_MAX_REPLAYS,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(dlq::console::serve(listener, console, async move {
        let _ = stopped.await;
    }));
    (url, stop)
}

/// Clicks what `locator` finds (a link or a button).
async fn click(browser: &Client, locator: Locator<'_>) {
    browser.find(locator).await.unwrap().click().await.unwrap();
}

/// Signs in on the console's sign-in page with `token`, from the keyboard.
async fn sign_in(browser: &Client, token: &str) {
    let field = browser.find(Locator::Css("#token")).await.unwrap();
    field.send_keys(token).await.unwrap();
    field.send_keys(&Key::Enter.to_string()).await.unwrap();
}

/// A screenshot that is a picture of something: a PNG of the window's size
/// with more than a few colours (not a blank or error page).
fn check_screenshot(png: &[u8], name: &str) {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert!(
        frame.width > 300 && frame.height > 300,
        "{name}: {}x{}",
        frame.width,
        frame.height
    );
    let colours: std::collections::HashSet<&[u8]> = pixels[..frame.buffer_size()]
        .chunks(frame.color_type.samples())
        .collect();
    assert!(
        colours.len() > 20,
        "{name}: {} colours, a blank page",
        colours.len()
    );
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(dir.join(format!("console-{name}.png")), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_sees_why_a_charge_died_replays_it_and_the_order_completes() {
    let (system, order) = System::with_a_dead_charge().await;
    let (console, stop) = console(&system).await;
    let driver = Driver::start().await;
    let browser = driver.browser(1280, 900).await;

    // Not signed in: the sign-in page. A wrong token is refused there.
    browser.goto(&console).await.unwrap();
    assert!(
        browser
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/login")
    );
    sign_in(&browser, "not-a-key-of-anyone").await;
    let refused = browser.find(Locator::Css("p.error")).await.unwrap();
    assert!(
        refused
            .text()
            .await
            .unwrap()
            .contains("unknown or invalid token")
    );
    sign_in(&browser, e2e::ADMIN_TOKEN).await;

    // The dead queues, then the payment worker's: the reason is shown.
    let row = browser
        .find(Locator::XPath("//tr[td/a[text()='payment.dead']]"))
        .await
        .unwrap();
    assert!(
        row.text().await.unwrap().contains('1'),
        "{}",
        row.text().await.unwrap()
    );
    click(&browser, Locator::LinkText("payment.dead")).await;
    let page = browser.source().await.unwrap();
    assert!(page.contains("exhausted"), "no reason shown");
    assert!(
        page.contains("payment gateway unavailable"),
        "no error shown"
    );
    assert!(page.contains(&order), "the order is not named");
    check_screenshot(&browser.screenshot().await.unwrap(), "queue");

    // The message, then its replay: first what would happen, then done.
    click(&browser, Locator::Css("table tbody td a code")).await;
    assert!(browser.source().await.unwrap().contains("x-death"));
    click(
        &browser,
        Locator::XPath("//div[@class='actions']//button[text()='Replay…']"),
    )
    .await;
    let page = browser.source().await.unwrap();
    assert!(page.contains("This will replay"), "no confirmation step");
    assert_eq!(
        system.env.depth("payment.dead").await,
        1,
        "replayed before confirming"
    );
    check_screenshot(&browser.screenshot().await.unwrap(), "confirm");
    // The confirmation has the focus: Enter confirms, no mouse needed.
    system.set_trouble(Trouble::default()).await;
    let focused = browser.active_element().await.unwrap();
    assert!(focused.text().await.unwrap().starts_with("Yes, replay 1"));
    focused.send_keys(&Key::Enter.to_string()).await.unwrap();
    eventually(Duration::from_secs(10), "the outcome page", || async {
        browser.source().await.unwrap().contains("Done: replay")
    })
    .await;
    assert!(browser.source().await.unwrap().contains("replayed"));

    let done = system.wait_final(&order).await;
    assert_eq!(done["status"], "CONFIRMED");
    assert_eq!(system.charges(&order).await.len(), 1);
    assert_eq!(system.env.depth("payment.dead").await, 0);

    // The audit trail names the key the operator signed in with.
    click(&browser, Locator::LinkText("Audit trail")).await;
    let audit = browser
        .find(Locator::Css("tbody tr"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        audit.contains("e2e-admin") && audit.contains("replay"),
        "{audit}"
    );
    browser.close().await.unwrap();

    // On a phone's width the page fits: nothing wider than the screen.
    let phone = driver.browser(390, 844).await;
    phone.goto(&format!("{console}/login")).await.unwrap();
    sign_in(&phone, e2e::ADMIN_TOKEN).await;
    phone.goto(&format!("{console}/audit")).await.unwrap();
    let fits = phone
        .execute(
            "return document.body.scrollWidth <= window.innerWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(fits, json!(true), "the page is wider than a phone");
    check_screenshot(&phone.screenshot().await.unwrap(), "phone");
    phone.close().await.unwrap();

    let _ = stop.send(());
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_serves_only_admins_and_changes_only_from_its_own_pages() {
    let (system, _order) = System::with_a_dead_charge().await;
    let (console, stop) = console(&system).await;
    let http = topology::https::client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let api = format!("{console}/api/queues");
    // No token, a wrong one, the orders role.
    assert_eq!(http.get(&api).send().await.unwrap().status(), 401);
    let wrong = http
        .get(&api)
        .bearer_auth("nobody-has-this-key")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let orders = http
        .get(&api)
        .bearer_auth(e2e::ORDERS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(orders.status(), 403);
    // A page without a token sends the browser to sign in.
    let page = http
        .get(format!("{console}/queues/payment.dead"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 303);
    assert_eq!(page.headers()["location"], "/login");
    // An admin reads the queues as JSON.
    let queues: serde_json::Value = http
        .get(&api)
        .bearer_auth(e2e::ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let payment = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "payment.dead")
        .unwrap();
    assert_eq!(payment["depth"], 1);
    // A confirmed replay posted from another site with the admin's cookie
    // is refused, and nothing is replayed.
    let forged = http
        .post(format!("{console}/queues/payment.dead/replay"))
        .header("cookie", format!("orderflow_console={}", e2e::ADMIN_TOKEN))
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("kind=exhausted&confirm=yes")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    // Garbage: an unknown queue, nothing chosen.
    let unknown = http
        .get(format!("{console}/api/queues/not-a-queue"))
        .bearer_auth(e2e::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let nothing = http
        .post(format!("{console}/queues/payment.dead/replay"))
        .bearer_auth(e2e::ADMIN_TOKEN)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("confirm=yes")
        .send()
        .await
        .unwrap();
    assert_eq!(nothing.status(), 400);
    assert_eq!(system.env.depth("payment.dead").await, 1);
    let _ = stop.send(());
    system.stop().await;
}
