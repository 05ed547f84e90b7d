//! The dashboard in a real browser, and the canary report: a rollout under HTTP load
//! in the netns lab, the agent serving its dashboard on the node, headless Chromium
//! (Debian's `chromium` + `chromium-driver`, installed by `cargo xtask bootstrap`)
//! driven over WebDriver from the client namespace.
//!
//! The page must show the service and follow a `canary set-weight` within 2 s, refuse
//! a control sent without the token, roll back with the token (history: `operator:ui`
//! and the reason), and log no error in the browser console. Then a fault in the
//! canary makes the analysis roll the next rollout back (rule `error-rate`, the failing
//! metric, or `error-spike`), and `canary report` must hold the plots and name that
//! rule.
//!
//! `CANARY_UPDATE_SCREENSHOT=1` also writes the screenshot to docs/dashboard.png.

use std::{
    io::Write,
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::{set_faults, ADMIN_PORT, HTTP_PORT},
    client::http_load_with_retries,
    http_load, log_dir,
    topology::{CANARY_V4, NODE_CLIENT_V4},
    Faults, Topology, VIP_V4,
};
use fantoccini::{Client, ClientBuilder, Locator};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const UI_PORT: u16 = 9480;
const WEBDRIVER_PORT: u16 = 9515;
const TOKEN: &str = "lab-dashboard-token-0123456789";

const POLICY: &str = r#"step = [ { at = 0, weight = 50 }, { at = "10m", weight = 100 } ]
[[metric]]
name = "error-rate"
threshold = 1.05
window = "60s"
[[rule]]
name = "error-spike"
when = "error-rate > baseline * 1.5"
action = "immediate-rollback"
"#;

/// chromedriver's legacy log endpoint: the browser console since the last call.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!("session/{}/se/log", session_id.unwrap_or("")))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// Polls `probe` (a JavaScript expression) until `ok` accepts its value.
async fn wait_js(
    browser: &Client,
    probe: &str,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<(serde_json::Value, Duration)> {
    let start = Instant::now();
    loop {
        let v = browser.execute(&format!("return {probe};"), vec![]).await?;
        if ok(&v) {
            return Ok((v, start.elapsed()));
        }
        if start.elapsed() > within {
            bail!("after {within:?}, `{probe}` is {v}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fills the service's control form and submits it; returns the result line.
async fn control(browser: &Client, action: &str, reason: &str) -> Result<String> {
    let form = browser.find(Locator::Css("#svc-web form.controls")).await?;
    form.find(Locator::Css("select[name=action]"))
        .await?
        .select_by_value(action)
        .await?;
    let field = form.find(Locator::Css("input[name=reason]")).await?;
    field.clear().await?;
    field.send_keys(reason).await?;
    browser
        .execute(
            "document.querySelector('#svc-web .result').textContent = '';",
            vec![],
        )
        .await?;
    form.find(Locator::Css("button[type=submit]"))
        .await?
        .click()
        .await?;
    let (v, _) = wait_js(
        browser,
        "document.querySelector('#svc-web .result').textContent",
        Duration::from_secs(5),
        |v| v.as_str().is_some_and(|s| !s.is_empty()),
    )
    .await?;
    Ok(v.as_str().unwrap_or_default().to_string())
}

fn token_file(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(format!("ui-token-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?
        .write_all(format!("{TOKEN}\n").as_bytes())?;
    Ok(path)
}

fn parse_report(html: &str, rule: &str) -> Result<()> {
    let dom = tl::parse(html, tl::ParserOptions::default())?;
    let parser = dom.parser();
    let select = |css: &str| -> Vec<&tl::HTMLTag> {
        dom.query_selector(css)
            .map(|it| {
                it.filter_map(|h| h.get(parser).and_then(|n| n.as_tag()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let attr = |tag: &tl::HTMLTag, name: &str| -> String {
        tag.attributes()
            .get(name)
            .flatten()
            .map(|v| v.as_utf8_str().to_string())
            .unwrap_or_default()
    };
    ensure!(
        select("script").is_empty(),
        "the report must need no script"
    );
    let outcome = select("div.outcome");
    ensure!(
        outcome.len() == 1 && attr(outcome[0], "data-state") == "rolled-back",
        "outcome: {:?}",
        outcome
            .iter()
            .map(|t| t.inner_text(parser))
            .collect::<Vec<_>>()
    );
    let fired: Vec<String> = select("span.fired")
        .iter()
        .map(|t| attr(t, "data-rule"))
        .collect();
    ensure!(fired == [rule], "fired rules: {fired:?}, expected {rule}");
    let svgs = select("svg");
    ensure!(svgs.len() >= 4, "{} plots", svgs.len());
    let lines: Vec<String> = select("polyline")
        .iter()
        .map(|t| attr(t, "data-series"))
        .collect();
    for series in ["canary %", "canary", "stable", "limit (max)", "canary 5xx"] {
        ensure!(
            lines.iter().any(|l| l == series),
            "no {series:?} line among {lines:?}"
        );
    }
    let metric = select("div.metric");
    ensure!(
        metric.len() == 1 && attr(metric[0], "data-metric") == "error-rate",
        "metric sections: {}",
        metric.len()
    );
    let metric_text = metric[0].inner_text(parser);
    ensure!(
        metric_text.contains("fail"),
        "no failing verdict: {metric_text}"
    );
    let timeline = select("tr.transition")
        .iter()
        .map(|t| t.inner_text(parser).to_string())
        .collect::<Vec<_>>();
    ensure!(
        timeline
            .iter()
            .any(|r| r.contains("rolled-back") && r.contains(&format!("rule:{rule}"))),
        "timeline: {timeline:#?}"
    );
    Ok(())
}

#[test]
fn dashboard_in_a_browser_and_the_canary_report() -> Result<()> {
    let test_start = Instant::now();
    ensure!(
        Path::new("/usr/bin/chromedriver").exists() && Path::new("/usr/bin/chromium").exists(),
        "chromium and chromium-driver are missing: `cargo xtask bootstrap` installs them"
    );
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let token = token_file(log_dir())?;
    let _token_cleanup = Cleanup(token.clone());
    // The first lines continue the harness's [agent] table.
    let services = format!(
        "ui_listen = \"{NODE_CLIENT_V4}:{UI_PORT}\"\nui_token_file = \"{}\"\n",
        token.display()
    ) + &lab_service("web", 80, HTTP_PORT, "policy = \"policy.toml\"");
    let agent = Agent::start_with_files(&topo.node, &services, &[("policy.toml", POLICY)], &[])?;
    agent.cli(&["rollout", "start", "web"])?;
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let profile = log_dir().join(format!("chromium-{}", std::process::id()));
    let _profile_cleanup = Cleanup(profile.clone());
    let mut driver = topo.client.spawn(
        "/usr/bin/chromedriver",
        &[&format!("--port={WEBDRIVER_PORT}")],
    )?;
    driver.wait_for_log("started successfully", Duration::from_secs(20))?;
    let url = format!("http://{NODE_CLIENT_V4}:{UI_PORT}/");
    let screenshot = log_dir().join(format!("dashboard-{}.png", std::process::id()));

    let browser_phase = |load_until: Instant| -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let caps = serde_json::json!({
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        "--disable-dev-shm-usage", "--window-size=1500,1900",
                        format!("--user-data-dir={}", profile.display()),
                    ],
                },
                "goog:loggingPrefs": { "browser": "ALL" },
            });
            let serde_json::Value::Object(caps) = caps else {
                unreachable!()
            };
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let browser = tokio::time::timeout(
                Duration::from_secs(30),
                ClientBuilder::new(connector)
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{WEBDRIVER_PORT}")),
            )
            .await
            .context("starting Chromium")??;
            let result = browse(&browser, &agent, &url, &screenshot, load_until).await;
            let _ = browser.close().await;
            result
        })
    };

    // Phase 1: the live page, set-weight, refused and accepted controls, under load.
    let load_for = Duration::from_secs(25);
    let load_until = Instant::now() + load_for;
    std::thread::scope(|scope| -> Result<()> {
        // Clients as browsers and HTTP libraries behave: the rollback drains the
        // canary's keep-alive connections, and a request racing that close is retried.
        let load = scope.spawn(|| {
            topo.client
                .enter(|| http_load_with_retries(vip, "/", 150, load_for, 16))
        });
        let browsed = topo.client.enter(|| browser_phase(load_until));
        let report = load.join().expect("load thread")?;
        browsed?;
        ensure!(
            report.failures.is_empty(),
            "failed requests: {:?}",
            report.failures
        );
        Ok(())
    })?;
    println!("browser phase done at {:?}", test_start.elapsed());

    // Phase 2: a new rollout, a fault in the canary, the rule rolls it back.
    agent.cli(&["rollout", "start", "web"])?;
    let canary_admin = SocketAddr::new(CANARY_V4.into(), ADMIN_PORT);
    let rolled_back = std::thread::scope(|scope| -> Result<Duration> {
        let load = scope.spawn(|| {
            topo.client
                .enter(|| http_load(vip, "/", 200, Duration::from_secs(12), 32))
        });
        std::thread::sleep(Duration::from_secs(3));
        topo.client.enter(|| {
            set_faults(
                canary_admin,
                &Faults {
                    error_rate: 1.0,
                    ..Default::default()
                },
            )
        })?;
        let after = agent.wait_for_rollout("rolled-back", Duration::from_secs(8))?;
        load.join().expect("load thread")?;
        after.ok_or_else(|| anyhow!("no rollback: {}", agent.status().unwrap_or_default()))
    })?;
    println!("rule rolled back {rolled_back:?} after the fault");
    // The failing metric's own rule or the policy's error-spike, whichever the
    // analysis reports first: the history names it, and so must the report.
    let history = agent.cli(&["history", "web"])?;
    let rule = ["error-spike", "error-rate"]
        .into_iter()
        .find(|r| {
            history.lines().any(|l| {
                l.contains("-> rolled-back") && l.contains(&format!("by rule:{r}: rule {r} fired"))
            })
        })
        .ok_or_else(|| anyhow!("no rule rolled back:\n{history}"))?;

    let out = agent.dir.join("report.html");
    let state_dir = agent.dir.join("state");
    let said = agent.cli(&[
        "report",
        "web",
        "--out",
        &out.to_string_lossy(),
        "--state-dir",
        &state_dir.to_string_lossy(),
    ])?;
    ensure!(said.contains("report written"), "{said}");
    let html = std::fs::read_to_string(&out)?;
    parse_report(&html, rule).with_context(|| format!("report {}", out.display()))?;
    println!(
        "report: {} bytes at {}; test took {:?}",
        html.len(),
        out.display(),
        test_start.elapsed()
    );
    if std::env::var_os("CANARY_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
        std::fs::create_dir_all(&docs)?;
        std::fs::copy(&screenshot, docs.join("dashboard.png"))?;
    }
    Ok(())
}

/// Removes a file or directory the test made, on every exit path.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn browse(
    browser: &Client,
    agent: &Agent,
    url: &str,
    screenshot: &Path,
    load_until: Instant,
) -> Result<()> {
    browser.goto(url).await?;
    ensure!(browser.title().await? == "canary dashboard");
    // The service appears with its rollout at the first step's 50 %.
    wait_js(
        browser,
        "document.querySelector('#svc-web .weight')?.dataset.weightBp",
        Duration::from_secs(10),
        |v| v == "5000",
    )
    .await?;
    let heading = browser
        .find(Locator::Css("#svc-web h2"))
        .await?
        .text()
        .await?;
    ensure!(heading == "web", "{heading}");
    let state = browser
        .find(Locator::Css("#svc-web .state"))
        .await?
        .text()
        .await?;
    ensure!(state == "progressing", "{state}");

    // A weight set from the CLI shows within 2 s.
    agent.cli(&["set-weight", "web", "30"])?;
    let (_, took) = wait_js(
        browser,
        "document.querySelector('#svc-web .weight')?.dataset.weightBp",
        Duration::from_secs(2),
        |v| v == "3000",
    )
    .await?;
    println!("set-weight 30 showed on the page after {took:?}");

    // Without the token a control is refused, and nothing changes.
    let token_input = browser.find(Locator::Css("#token")).await?;
    token_input.clear().await?;
    let answer = control(browser, "rollback", "dashboard test without a token").await?;
    ensure!(
        answer.contains("refused") && answer.contains("token"),
        "{answer}"
    );
    let status = agent.status()?;
    ensure!(
        status["services"][0]["weight_bp"] == 3000
            && status["services"][0]["rollout"]["state"] == "paused",
        "{status}"
    );
    // A wrong token neither.
    token_input.send_keys("not-the-token-at-all").await?;
    let answer = control(browser, "rollback", "dashboard test wrong token").await?;
    ensure!(answer.contains("wrong token"), "{answer}");

    // With the token, rollback rolls back, and the history says who and why.
    token_input.clear().await?;
    token_input.send_keys(TOKEN).await?;
    let answer = control(browser, "rollback", "dashboard test rollback").await?;
    ensure!(answer.starts_with("done: rollback"), "{answer}");
    let status = agent.status()?;
    ensure!(
        status["services"][0]["weight_bp"] == 0
            && status["services"][0]["rollout"]["state"] == "rolled-back",
        "{status}"
    );
    let history = agent.cli(&["history", "web"])?;
    ensure!(
        history
            .lines()
            .any(|l| l.contains("rolled-back")
                && l.contains("by operator:ui: dashboard test rollback")),
        "{history}"
    );
    wait_js(
        browser,
        "document.querySelector('#svc-web table.history tbody tr')?.textContent",
        Duration::from_secs(2),
        |v| {
            v.as_str()
                .is_some_and(|s| s.contains("operator:ui") && s.contains("dashboard test rollback"))
        },
    )
    .await?;
    wait_js(
        browser,
        "document.querySelector('#svc-web .weight')?.dataset.weightBp",
        Duration::from_secs(2),
        |v| v == "0",
    )
    .await?;
    // The charts are there and drawn.
    let (charts, _) = wait_js(
        browser,
        "document.querySelectorAll('#svc-web svg.chart polyline').length",
        Duration::from_secs(5),
        |v| v.as_u64().unwrap_or(0) >= 4,
    )
    .await?;
    println!("{charts} chart lines on the page");
    // Let the plots fill with a few more seconds of load before the screenshot.
    let rest = load_until.saturating_duration_since(Instant::now());
    tokio::time::sleep(rest.saturating_sub(Duration::from_secs(2))).await;
    std::fs::write(screenshot, browser.screenshot().await?)?;

    // The console: no errors, but for the two refusals the test provoked (Chromium
    // logs a fetch answered 401 as a network error).
    let log = browser.issue_cmd(BrowserLog).await?;
    ensure!(log.is_array(), "the browser log is not a list: {log}");
    let entries = log.as_array().cloned().unwrap_or_default();
    let errors: Vec<_> = entries
        .iter()
        .filter(|e| e["level"] == "SEVERE")
        .filter(|e| {
            let m = e["message"].as_str().unwrap_or("");
            !(m.contains("/api/control") && m.contains("401"))
        })
        .collect();
    ensure!(errors.is_empty(), "browser console errors: {errors:#?}");
    let refusals = entries
        .iter()
        .filter(|e| e["message"].as_str().unwrap_or("").contains("401"))
        .count();
    ensure!(refusals <= 2, "{entries:#?}");
    Ok(())
}
