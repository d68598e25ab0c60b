//! Chromium (Debian's, headless) driven over WebDriver by Debian's chromedriver, for tests
//! that need a real browser to act: click, type, follow redirects, run the page's scripts.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{PATIENCE, free_port};

/// The key WebDriver names element references by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver on a free loopback port, stopped on drop.
pub struct Driver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
    session: String,
}

impl Driver {
    pub async fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver must be installed (make deps: chromium-driver)");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + PATIENCE;
        while http.get(format!("{url}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::tempdir().expect("profile");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let created: Value = http
            .post(format!("{url}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session JSON");
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        Self {
            child,
            url,
            _profile: profile,
            session,
        }
    }

    pub async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.url, self.session);
        let mut request = reqwest::Client::new().request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request
            .send()
            .await
            .expect("WebDriver call")
            .json()
            .await
            .expect("WebDriver JSON");
        answer["value"].clone()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    pub async fn current_url(&self) -> String {
        let url = self.command(reqwest::Method::GET, "/url", None).await;
        url.as_str().unwrap_or_default().to_string()
    }

    pub async fn source(&self) -> String {
        let source = self.command(reqwest::Method::GET, "/source", None).await;
        source.as_str().unwrap_or_default().to_string()
    }

    /// The element `css` selects, waiting for it to appear; panics with the page if it does
    /// not.
    pub async fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = self
                .command(
                    reqwest::Method::POST,
                    "/element",
                    Some(json!({"using": "css selector", "value": css})),
                )
                .await;
            if let Some(id) = found[ELEMENT].as_str() {
                return id.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {css:?} ({found}) on {}:\n{}",
                self.current_url().await,
                self.source().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        let path = format!("/element/{id}/value");
        self.command(reqwest::Method::POST, &path, Some(json!({ "text": text })))
            .await;
    }

    pub async fn click(&self, css: &str) {
        let id = self.find(css).await;
        let path = format!("/element/{id}/click");
        self.command(reqwest::Method::POST, &path, Some(json!({})))
            .await;
    }

    pub async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        let text = self
            .command(reqwest::Method::GET, &format!("/element/{id}/text"), None)
            .await;
        text.as_str().unwrap_or_default().to_string()
    }

    /// Runs `script` (a function body) in the page; returns what it returns.
    pub async fn execute(&self, script: &str) -> Value {
        let body = json!({ "script": script, "args": [] });
        self.command(reqwest::Method::POST, "/execute/sync", Some(body))
            .await
    }

    pub async fn quit(&self) {
        let _ = self.command(reqwest::Method::DELETE, "", None).await;
    }
}
