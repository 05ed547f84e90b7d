//! What a writer to etcd can and cannot make a fleet do (README, Security): two nodes
//! against a real etcd serving TLS only to clients with a certificate of the fleet's
//! CA, each node with its own. A client without one is refused by etcd; a client with
//! one (any node's) can set weights and forward rollout verbs, and nothing else: no
//! uninstall or reload, no weight above 100 %, no rollout of another policy or with a
//! clock far ahead, no counters off a lease. Bad keys are reported and skipped, and
//! the good ones keep applying.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context, Result};
use canary_lab::{
    agent::Agent,
    fleet::{fleet_service, FleetCerts, FleetLab, ETCD_V4},
    log_dir,
};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const LEASE_S: u64 = 2;
const PREFIX: &str = "/canary";
/// The gate's webhook carries secrets (userinfo, path, query) that must not reach etcd.
const POLICY: &str = r#"step = [ { at = 0, weight = 10 }, { at = "20s", weight = 30 }, { at = "40s", weight = 60 } ]
[[stage]]
name = "early"
weights = [0.01, 20]
[[stage]]
name = "late"
weights = [20.01, 100]
gate = { approval = true, webhook = "http://hookuser:hooksecret@198.18.100.9:9/approve/t0ken?key=abc", timeout = "1h" }
"#;

fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let until = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < until {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(anyhow!(
        "{what} not within {limit:?} (last error: {last:?})"
    ))
}

/// The keys a node refused, with why.
fn rejected(agent: &Agent) -> Result<serde_json::Map<String, serde_json::Value>> {
    Ok(agent.status()?["fleet"]["rejected"]
        .as_object()
        .cloned()
        .unwrap_or_default())
}

fn refused_with(agent: &Agent, key: &str, why: &str) -> Result<Option<()>> {
    let r = rejected(agent)?;
    Ok(r.get(key)
        .and_then(|v| v.as_str())
        .is_some_and(|v| v.contains(why))
        .then_some(()))
}

fn options(certs: &FleetCerts, who: Option<&str>) -> Result<ConnectOptions> {
    let mut tls =
        TlsOptions::new().ca_certificate(Certificate::from_pem(std::fs::read(certs.ca())?));
    if let Some(who) = who {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(certs.cert(who))?,
            std::fs::read(certs.key(who))?,
        ));
    }
    Ok(ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2))
        .with_tls(tls))
}

#[test]
fn an_etcd_writer_can_move_weights_within_bounds_and_nothing_more() -> Result<()> {
    let lab = FleetLab::build()?;
    let _backends = lab.start_backends(Path::new(BACKEND_BIN))?;
    let certs = FleetCerts::generate(&log_dir().join(format!("certs-{}", lab.fabric.name())), 2)?;
    let _etcd = lab.start_etcd_tls(&certs)?;
    let services = fleet_service("mode = \"hash\"\npolicy = \"policy.toml\"");
    let mut agents = Vec::new();
    for i in 0..2 {
        agents.push(lab.start_agent_tls(
            i,
            &services,
            &[("policy.toml", POLICY)],
            LEASE_S,
            &[],
            &certs,
        )?);
    }
    let leader = poll("a leader over TLS", Duration::from_secs(15), || {
        let names: Vec<Option<String>> = agents
            .iter()
            .map(|a| Ok(a.status()?["fleet"]["leader"].as_str().map(String::from)))
            .collect::<Result<_>>()?;
        Ok(match names.as_slice() {
            [Some(a), Some(b)] if a == b => Some(a.clone()),
            _ => None,
        })
    })?;
    let (li, fi) = if leader == "n1" { (0, 1) } else { (1, 0) };
    let endpoint = format!("https://{ETCD_V4}:2379");

    lab.fabric.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            // No client certificate, or one of another CA: etcd answers nothing.
            for who in [None, Some("rogue")] {
                let got = async {
                    let mut c =
                        Client::connect([endpoint.as_str()], Some(options(&certs, who)?)).await?;
                    c.put(format!("{PREFIX}/weights/web"), "{}", None).await?;
                    anyhow::Ok(())
                };
                ensure!(
                    tokio::time::timeout(Duration::from_secs(5), got)
                        .await
                        .map_or(true, |r| r.is_err()),
                    "etcd took a write from {who:?}"
                );
            }
            // A writer with a node's certificate.
            let mut c =
                Client::connect([endpoint.as_str()], Some(options(&certs, Some("n2"))?)).await?;
            let at_ms = 1u64;
            for (key, value) in [
                (
                    "commands/evil-uninstall",
                    r#"{"cmd":"uninstall"}"#.to_string(),
                ),
                ("commands/evil-reload", r#"{"cmd":"reload"}"#.to_string()),
                (
                    "commands/evil-weight",
                    r#"{"cmd":"set-weight","service":"web","weight_bp":20000,"by":"x"}"#
                        .to_string(),
                ),
                (
                    "weights/web",
                    format!(r#"{{"weight_bp":20000,"at_ms":{at_ms}}}"#),
                ),
                (
                    "weights/nosuch",
                    format!(r#"{{"weight_bp":100,"at_ms":{at_ms}}}"#),
                ),
                ("weights/garbage", "not json".to_string()),
                ("nodes/forged", "{}".to_string()),
            ] {
                c.put(format!("{PREFIX}/{key}"), value, None).await?;
            }
            c.put(
                [format!("{PREFIX}/weights/").as_bytes(), b"\xff\xfe"].concat(),
                format!(r#"{{"weight_bp":100,"at_ms":{at_ms}}}"#),
                None,
            )
            .await?;
            // After the bad ones, a good weight: every node applies it.
            c.put(
                format!("{PREFIX}/weights/web"),
                format!(r#"{{"weight_bp":2500,"at_ms":{at_ms}}}"#),
                None,
            )
            .await?;
            for id in ["evil-uninstall", "evil-reload", "evil-weight"] {
                let key = format!("{PREFIX}/results/{id}");
                let answer = tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        if let Some(kv) = c.get(key.as_str(), None).await?.kvs().first() {
                            return anyhow::Ok(kv.value_str()?.to_string());
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
                .await
                .with_context(|| format!("no answer to {id}"))??;
                let why = if id == "evil-weight" {
                    "above 100 %"
                } else {
                    "not a command the fleet forwards"
                };
                ensure!(answer.contains(why), "{id}: {answer}");
            }
            anyhow::Ok(())
        })
    })?;

    for agent in &agents {
        // Neither uninstalled nor reloaded: both answer, with the good weight.
        poll(
            "the good weight on every node",
            Duration::from_secs(10),
            || Ok((agent.status()?["services"][0]["weight_bp"] == 2500).then_some(())),
        )?;
        let w = format!("{PREFIX}/weights/");
        poll("bad weights reported", Duration::from_secs(5), || {
            let r = rejected(agent)?;
            let bad = |k: &str, why: &str| {
                r.get(&format!("{w}{k}"))
                    .and_then(|v| v.as_str())
                    .is_some_and(|v| v.contains(why))
            };
            Ok((bad("nosuch", "no service named")
                && bad("garbage", "not a desired weight")
                && r.keys()
                    .any(|k| k.starts_with(&w) && k.contains('\u{fffd}')))
            .then_some(()))
        })?;
        // weights/web was refused at 20000 and is accepted again at 2500.
        ensure!(!rejected(agent)?.contains_key(&format!("{w}web")));
    }
    poll(
        "the forged node report refused",
        Duration::from_secs(5),
        || {
            refused_with(
                &agents[li],
                &format!("{PREFIX}/nodes/forged"),
                "not on a lease",
            )
        },
    )?;

    // A rollout, started on the follower (forwarded) and paused; its stored copy
    // in etcd names the gate's webhook without secrets.
    agents[fi].cli(&["rollout", "start", "web"])?;
    poll("the rollout running", Duration::from_secs(10), || {
        Ok(
            (agents[li].status()?["services"][0]["rollout"]["state"] == "progressing")
                .then_some(()),
        )
    })?;
    agents[li].cli(&["pause", "web", "--reason", "forgery test"])?;
    poll(
        "the rollout paused on both",
        Duration::from_secs(10),
        || {
            Ok(agents
                .iter()
                .map(|a| Ok(a.status()?["services"][0]["rollout"]["state"] == "paused"))
                .collect::<Result<Vec<bool>>>()?
                .iter()
                .all(|p| *p)
                .then_some(()))
        },
    )?;
    let paused_weight = agents[li].status()?["services"][0]["weight_bp"].clone();
    let forged_clock = lab.fabric.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut c =
                Client::connect([endpoint.as_str()], Some(options(&certs, Some("n2"))?)).await?;
            let key = format!("{PREFIX}/rollouts/web");
            let got = c.get(key.as_str(), None).await?;
            let text = got
                .kvs()
                .first()
                .context("rollouts/web")?
                .value_str()?
                .to_string();
            ensure!(
                !text.contains("hooksecret")
                    && !text.contains("t0ken")
                    && !text.contains("key=abc"),
                "the webhook's secrets are in etcd: {text}"
            );
            ensure!(text.contains("http://198.18.100.9:9"), "{text}");
            // A year ahead on the controller clock.
            let mut stored: serde_json::Value = serde_json::from_str(&text)?;
            let clock = stored["clock_ms"].as_u64().context("clock_ms")?;
            let forged = clock + 365 * 24 * 3600 * 1000;
            stored["clock_ms"] = forged.into();
            c.put(key.as_str(), serde_json::to_vec(&stored)?, None)
                .await?;
            anyhow::Ok(forged)
        })
    })?;
    let key = format!("{PREFIX}/rollouts/web");
    poll(
        "the follower refusing the forged clock",
        Duration::from_secs(5),
        || refused_with(&agents[fi], &key, "ahead of this node's"),
    )?;
    // The leader goes; the follower takes over without adopting the forgery, and
    // keeps its own copy of the rollout.
    agents[li].signal_and_wait(libc::SIGKILL);
    poll("the follower leading", Duration::from_secs(15), || {
        Ok((agents[fi].status()?["fleet"]["leading"] == true).then_some(()))
    })?;
    // It stores the rollout again at its own controller clock, not the forged one.
    lab.fabric.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut c =
                Client::connect([endpoint.as_str()], Some(options(&certs, Some("n1"))?)).await?;
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                let got = c.get(key.as_str(), None).await?;
                let text = got
                    .kvs()
                    .first()
                    .context("rollouts/web")?
                    .value_str()?
                    .to_string();
                let stored: serde_json::Value = serde_json::from_str(&text)?;
                let clock = stored["clock_ms"].as_u64().context("clock_ms")?;
                if clock + 24 * 3600 * 1000 < forged_clock {
                    return anyhow::Ok(());
                }
                ensure!(
                    Instant::now() < until,
                    "the new leader took the forged clock: {clock} (forged {forged_clock})"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    })?;
    let s = agents[fi].status()?;
    ensure!(
        s["services"][0]["rollout"]["state"] == "paused"
            && s["services"][0]["weight_bp"] == paused_weight,
        "{s}"
    );
    Ok(())
}
