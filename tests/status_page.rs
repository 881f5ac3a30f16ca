//! The status page on the admin listener, in a real browser: headless Chromium driven through
//! WebDriver (chromedriver). It loads with no console errors, asks for the admin token, its chart
//! moves after traffic, and its purge form purges (the next read is a miss).

mod common;

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{config_for, free_port, get, x_cache, Gateway, Process, Upstream};
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "status-page-token";

/// The browser's console log (chromedriver's log endpoint), which also holds failed loads.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.expect("a session")
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(r#"{"type": "browser"}"#.to_owned()),
        )
    }
}

/// Polls `probe` every 100 ms for up to 20 s until it gives `Some`.
async fn until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text_of(browser: &Client, id: &str) -> String {
    browser
        .find(Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("no #{id}: {e}"))
        .text()
        .await
        .unwrap()
}

fn chromedriver() -> (Process, u16) {
    let port = free_port();
    let dir = tempfile::TempDir::new().unwrap();
    let mut process = Process::spawn(
        "chromedriver",
        Path::new("chromedriver"),
        &[&format!("--port={port}")],
        dir,
    );
    process.wait_for_port(port);
    (process, port)
}

#[tokio::test]
async fn the_status_page_shows_live_traffic_and_purges_in_a_browser() {
    let upstream = Upstream::start();
    let admin_port = free_port();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        &format!(
            "[admin]\naddress = \"127.0.0.1:{admin_port}\"\ntoken = \"{ADMIN_TOKEN}\"\n\n\
             [[routes]]\nname = \"product-read\"\npath = \"/products/{{id}}\"\n\
             methods = [\"GET\", \"HEAD\"]\ncache = {{ ttl = \"60s\" }}\n"
        ),
    ));
    let page_url = format!("http://127.0.0.1:{admin_port}/");

    // Self-contained: nothing may load from elsewhere.
    let page = common::Client::new().get(&page_url).await;
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = String::from_utf8_lossy(&page.body).into_owned();
    assert!(!html.contains("http://") && !html.contains("https://"));
    // The data needs the token, like /metrics.
    let data = common::Client::new()
        .get(&format!("http://127.0.0.1:{admin_port}/status.json"))
        .await;
    assert_eq!(data.status, hyper::StatusCode::UNAUTHORIZED);

    let (_driver, driver_port) = chromedriver();
    // fantoccini's client is built with rustls; the process picks its crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("browserName".into(), json!("chrome"));
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1280,900"]}),
    );
    capabilities.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
    let browser = ClientBuilder::rustls()
        .unwrap()
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .expect("a WebDriver session in headless Chromium");

    // Every check runs before the browser is closed, whatever happens.
    let checks = AssertUnwindSafe(async {
        browser.goto(&page_url).await.unwrap();
        assert_eq!(browser.title().await.unwrap(), "cachegate status");

        // Asked for the token, then live.
        until("the token prompt", || async {
            (text_of(&browser, "conn").await == "enter the admin token").then_some(())
        })
        .await;
        browser
            .find(Locator::Id("token"))
            .await
            .unwrap()
            .send_keys(ADMIN_TOKEN)
            .await
            .unwrap();
        browser
            .find(Locator::Id("token-save"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        until("the page to go live", || async {
            (text_of(&browser, "conn").await == "live").then_some(())
        })
        .await;

        // Traffic moves the chart (sent while the page polls) and fills the route table.
        until("the chart to show traffic", || async {
            for _ in 0..20 {
                get(&gateway, "/products/1", &[]).await;
            }
            let chart = browser
                .execute(
                    "const c = document.getElementById('chart'); return [Number(c.dataset.points), Number(c.dataset.lastRps)];",
                    vec![],
                )
                .await
                .unwrap();
            (chart[0].as_f64().unwrap() >= 2.0 && chart[1].as_f64().unwrap() > 0.0).then_some(())
        })
        .await;
        let routes = until("the route in the table", || async {
            let text = text_of(&browser, "routes").await;
            text.contains("product-read").then_some(text)
        })
        .await;
        assert!(routes.contains("product-read"), "{routes}");

        // The purge form purges: a hit before, a miss after.
        assert_eq!(x_cache(&get(&gateway, "/products/1", &[]).await), "HIT");
        browser
            .find(Locator::Id("purge-value"))
            .await
            .unwrap()
            .send_keys("/products/1")
            .await
            .unwrap();
        browser
            .find(Locator::Css("#purge-form button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let result = until("the purge's answer", || async {
            let text = text_of(&browser, "purge-result").await;
            text.starts_with("purged:").then_some(text)
        })
        .await;
        assert!(result.contains("/products/1"), "{result}");
        assert_eq!(x_cache(&get(&gateway, "/products/1", &[]).await), "MISS");
        until("the purge in the recent list", || async {
            text_of(&browser, "purges")
                .await
                .contains("path:/products/1")
                .then_some(())
        })
        .await;

        // No console errors, no failed loads.
        let log = browser.issue_cmd(BrowserLog).await.unwrap();
        let errors: Vec<&Value> = log
            .as_array()
            .unwrap()
            .iter()
            .filter(|entry| entry["level"] == "SEVERE" || entry["level"] == "WARNING")
            .collect();
        assert!(errors.is_empty(), "console errors: {errors:#?}");
    })
    .catch_unwind()
    .await;
    browser.close().await.unwrap();
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
}
