//! deploy/: the DaemonSet and its ConfigMap parse as Kubernetes objects (k8s-openapi's
//! types, unknown fields refused) and carry what the agent needs on a node; the
//! ConfigMap's agent config passes `canary check`.

use std::{collections::BTreeMap, path::Path};

use anyhow::{anyhow, ensure, Context, Result};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Probe, Volume},
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn deploy_file(name: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Parses `text` strictly: a misspelt field is an error, not silently dropped.
fn parse<T: serde::de::DeserializeOwned + serde::Serialize>(text: &str, what: &str) -> Result<T> {
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).context(what.to_string())?;
    let typed: T = serde_yaml_ng::from_value(value.clone()).context(what.to_string())?;
    // Round trip: every field of the file must survive the typed form.
    let back = serde_yaml_ng::to_value(&typed)?;
    ensure!(
        json(&value)? == prune(json(&back)?),
        "{what}: fields that Kubernetes does not know (or wrongly typed):\nfile: {}\nparsed: {}",
        json(&value)?,
        json(&back)?
    );
    Ok(typed)
}

fn json(v: &serde_yaml_ng::Value) -> Result<serde_json::Value> {
    Ok(serde_json::to_value(v)?)
}

/// Drops the empty objects serialization adds for absent optional structs.
fn prune(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.into_iter()
                .map(|(k, v)| (k, prune(v)))
                .filter(|(_, v)| !matches!(v, serde_json::Value::Object(o) if o.is_empty()))
                .collect(),
        ),
        serde_json::Value::Array(a) => serde_json::Value::Array(a.into_iter().map(prune).collect()),
        other => other,
    }
}

fn http_probe(probe: Option<&Probe>, what: &str) -> Result<(String, i32)> {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .ok_or_else(|| anyhow!("{what}: an httpGet probe"))?;
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(s) => return Err(anyhow!("{what}: named port {s}: use the number")),
    };
    Ok((get.path.clone().unwrap_or_default(), port))
}

#[test]
fn daemonset_manifest_has_what_the_agent_needs() -> Result<()> {
    let ds: DaemonSet = parse(&deploy_file("daemonset.yaml")?, "deploy/daemonset.yaml")?;
    let spec = ds.spec.as_ref().context("spec")?;
    let strategy = spec.update_strategy.as_ref().context("updateStrategy")?;
    ensure!(
        strategy.type_.as_deref() == Some("RollingUpdate"),
        "{strategy:?}"
    );
    let max = strategy
        .rolling_update
        .as_ref()
        .and_then(|r| r.max_unavailable.as_ref());
    ensure!(max == Some(&IntOrString::Int(1)), "maxUnavailable: {max:?}");
    let pod = spec.template.spec.as_ref().context("template.spec")?;
    ensure!(pod.host_network == Some(true), "hostNetwork");
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    ensure!(
        (5..=120).contains(&grace),
        "terminationGracePeriodSeconds {grace}"
    );
    let labels = spec.selector.match_labels.clone().unwrap_or_default();
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    ensure!(
        !labels.is_empty() && labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the selector must match the pod's labels"
    );

    let agent: &Container = pod
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .context("container agent")?;
    let security = agent.security_context.as_ref().context("securityContext")?;
    if security.privileged != Some(true) {
        let added: Vec<&str> = security
            .capabilities
            .as_ref()
            .and_then(|c| c.add.as_ref())
            .map(|a| a.iter().map(String::as_str).collect())
            .unwrap_or_default();
        for cap in ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"] {
            ensure!(added.contains(&cap), "capability {cap} missing: {added:?}");
        }
    }

    let volumes: BTreeMap<&str, &Volume> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mounts = agent.volume_mounts.iter().flatten();
    let mut mounted = BTreeMap::new();
    for m in mounts {
        let volume = volumes
            .get(m.name.as_str())
            .with_context(|| format!("mount {} names no volume", m.name))?;
        mounted.insert(m.mount_path.as_str(), (m, *volume));
    }
    let (bpffs, volume) = mounted.get("/sys/fs/bpf").context("/sys/fs/bpf mount")?;
    ensure!(
        volume.host_path.as_ref().map(|h| h.path.as_str()) == Some("/sys/fs/bpf"),
        "bpffs must be the host's /sys/fs/bpf"
    );
    ensure!(
        bpffs.mount_propagation.as_deref() == Some("Bidirectional"),
        "bpffs needs Bidirectional propagation, has {:?}",
        bpffs.mount_propagation
    );
    let (_, state) = mounted
        .get("/var/lib/canary")
        .context("/var/lib/canary mount")?;
    ensure!(
        state.host_path.as_ref().map(|h| h.path.as_str()) == Some("/var/lib/canary"),
        "state must be a hostPath"
    );
    // etcd is reached over TLS with this node's own client certificate, from the host.
    let (pki_mount, pki) = mounted
        .get("/etc/canary-pki")
        .context("/etc/canary-pki mount")?;
    ensure!(
        pki.host_path.as_ref().map(|h| h.path.as_str()) == Some("/etc/canary-pki")
            && pki_mount.read_only == Some(true),
        "the node's certificates come read-only from the host's /etc/canary-pki"
    );
    let (_, config) = mounted.get("/etc/canary").context("/etc/canary mount")?;
    let config_map = config
        .config_map
        .as_ref()
        .context("config comes from a ConfigMap")?;

    // The config the pods mount, its probes' port, and the agent's argument agree.
    let cm: ConfigMap = parse(&deploy_file("configmap.yaml")?, "deploy/configmap.yaml")?;
    ensure!(
        cm.metadata.name.as_deref() == Some(config_map.name.as_str()),
        "the DaemonSet mounts ConfigMap {:?}, the file defines {:?}",
        config_map.name,
        cm.metadata.name
    );
    ensure!(
        cm.metadata.namespace == ds.metadata.namespace,
        "ConfigMap and DaemonSet live in one namespace"
    );
    let data = cm.data.clone().unwrap_or_default();
    let agent_toml = data
        .get("agent.toml")
        .context("agent.toml in the ConfigMap")?;
    let fleet = agent_toml
        .split("[fleet]")
        .nth(1)
        .and_then(|f| f.split("[[service]]").next())
        .context("agent.toml has a [fleet] section")?;
    ensure!(
        fleet.contains("etcd = [\"https://") && !fleet.contains("http://"),
        "etcd only over https: {fleet}"
    );
    for (field, file) in [
        ("ca", "/etc/canary-pki/ca.pem"),
        ("cert", "/etc/canary-pki/node.pem"),
        ("key", "/etc/canary-pki/node-key.pem"),
    ] {
        ensure!(
            fleet.contains(&format!("{field} = \"{file}\"")),
            "[fleet] {field} = {file:?}: {fleet}"
        );
    }
    let args = agent.args.clone().unwrap_or_default();
    ensure!(
        args.windows(2)
            .any(|w| w[0] == "--config" && w[1] == "/etc/canary/agent.toml"),
        "{args:?}"
    );
    let port = agent_toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("metrics_listen = "))
        .and_then(|v| v.trim_matches('"').rsplit(':').next()?.parse::<i32>().ok())
        .context("agent.toml sets metrics_listen (the probes' listener)")?;
    for (probe, path, what) in [
        (agent.liveness_probe.as_ref(), "/healthz", "livenessProbe"),
        (agent.readiness_probe.as_ref(), "/readyz", "readinessProbe"),
    ] {
        let (got, got_port) = http_probe(probe, what)?;
        ensure!(got == path && got_port == port, "{what}: {got}:{got_port}");
    }

    // The agent itself validates the config and its policy.
    let dir = std::env::temp_dir().join(format!("canary-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (name, text) in &data {
        std::fs::write(dir.join(name), text)?;
    }
    let out = std::process::Command::new(canary_lab::agent::canary_bin()?)
        .arg("check")
        .arg(dir.join("agent.toml"))
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        out.status.success(),
        "canary check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_misspelt_manifest_field_fails() {
    let text = deploy_file("daemonset.yaml")
        .unwrap()
        .replace("hostNetwork: true", "hostNetwrok: true");
    assert!(parse::<DaemonSet>(&text, "mangled").is_err());
}
