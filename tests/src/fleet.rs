//! A fleet lab: three nodes, each with its own client, sharing the stable and canary
//! backends and an etcd on a common fabric (a bridge in its own namespace).
//!
//! ```text
//!  client1 ── cli0 node1 fab0 ─┐
//!  client2 ── cli0 node2 fab0 ─┤ br0 (fabric, etcd on 198.18.100.250)
//!  client3 ── cli0 node3 fab0 ─┤── eth0 stable (198.18.2.2, fabric .2)
//!                              └── eth0 canary (198.18.3.2, fabric .3)
//! ```
//!
//! Node i's client is 198.18.(10+i).2 behind 198.18.(10+i).1; the backends route each
//! client subnet back through its node, whose TC egress restores the service address.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    agent::{lab_service, Agent},
    backend::{self, Backends},
    netns::log_dir,
    topology::{Version, LEAF_IFACE, NODE_CLIENT_IFACE, VIP_RANGE_V4},
    ChildGuard, NetNs,
};

/// How many nodes the lab has.
pub const NODES: usize = 3;
/// etcd's client address on the fabric.
pub const ETCD_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 250);
const FABRIC_IFACE: &str = "fab0";

/// Node `i`'s (0-based) address on the fabric.
pub fn node_fabric_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 100, 11 + i as u8)
}

/// Node `i`'s client address.
pub fn client_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 11 + i as u8, 2)
}

fn node_client_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 11 + i as u8, 1)
}

/// A backend's address on the fabric (next to its service address).
fn backend_fabric_v4(version: Version) -> Ipv4Addr {
    match version {
        Version::Stable => Ipv4Addr::new(198, 18, 100, 2),
        Version::Canary => Ipv4Addr::new(198, 18, 100, 3),
    }
}

/// The namespaces; dropping it removes them and everything running in them.
pub struct FleetLab {
    pub fabric: NetNs,
    pub stable: NetNs,
    pub canary: NetNs,
    pub nodes: Vec<NetNs>,
    pub clients: Vec<NetNs>,
}

impl FleetLab {
    pub fn build() -> Result<FleetLab> {
        let mut lab = FleetLab {
            fabric: NetNs::new("fabric")?,
            stable: NetNs::new("stable")?,
            canary: NetNs::new("canary")?,
            nodes: Vec::new(),
            clients: Vec::new(),
        };
        for _ in 0..NODES {
            lab.nodes.push(NetNs::new("node")?);
            lab.clients.push(NetNs::new("client")?);
        }
        lab.wire()?;
        Ok(lab)
    }

    fn wire(&self) -> Result<()> {
        let f = &self.fabric;
        f.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
        f.add_address(&format!("{ETCD_V4}/24"), "br0")?;
        f.run(&["ip", "link", "set", "br0", "up"])?;
        let mut port = 0;
        let mut plug = |ns: &NetNs, iface: &str, addr: Ipv4Addr| -> Result<()> {
            port += 1;
            let name = format!("p{port}");
            f.run(&[
                "ip",
                "link",
                "add",
                &name,
                "type",
                "veth",
                "peer",
                "name",
                iface,
                "netns",
                ns.name(),
            ])?;
            f.run(&["ip", "link", "set", &name, "master", "br0", "up"])?;
            ns.add_address(&format!("{addr}/24"), iface)?;
            ns.run(&["ip", "link", "set", iface, "up"])?;
            Ok(())
        };
        for version in Version::ALL {
            let ns = self.backend(version);
            plug(ns, LEAF_IFACE, backend_fabric_v4(version))?;
            // The service's backend addresses, as the one-node lab has them.
            ns.add_address(&format!("{}/24", version.v4()), LEAF_IFACE)?;
            ns.run(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{}/64", version.v6()),
                "dev",
                LEAF_IFACE,
                "nodad",
            ])?;
        }
        for (i, (node, client)) in self.nodes.iter().zip(&self.clients).enumerate() {
            plug(node, FABRIC_IFACE, node_fabric_v4(i))?;
            node.run(&[
                "ip",
                "link",
                "add",
                NODE_CLIENT_IFACE,
                "type",
                "veth",
                "peer",
                "name",
                LEAF_IFACE,
                "netns",
                client.name(),
            ])?;
            node.add_address(&format!("{}/24", node_client_v4(i)), NODE_CLIENT_IFACE)?;
            client.add_address(&format!("{}/24", client_v4(i)), LEAF_IFACE)?;
            node.run(&["ip", "link", "set", NODE_CLIENT_IFACE, "up"])?;
            client.run(&["ip", "link", "set", LEAF_IFACE, "up"])?;
            // Full checksums from the client, as off a wire (see topology.rs).
            client.run(&["ethtool", "-K", LEAF_IFACE, "tx", "off"])?;
            client.run(&[
                "ip",
                "route",
                "add",
                VIP_RANGE_V4,
                "via",
                &node_client_v4(i).to_string(),
            ])?;
            node.run(&[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ])?;
            for version in Version::ALL {
                let via = backend_fabric_v4(version).to_string();
                let net = format!("{}/32", version.v4());
                node.run(&["ip", "route", "add", &net, "via", &via])?;
                let client_net = format!("198.18.{}.0/24", 11 + i);
                let back = node_fabric_v4(i).to_string();
                self.backend(version)
                    .run(&["ip", "route", "add", &client_net, "via", &back])?;
            }
        }
        Ok(())
    }

    pub fn backend(&self, version: Version) -> &NetNs {
        match version {
            Version::Stable => &self.stable,
            Version::Canary => &self.canary,
        }
    }

    pub fn start_backends(&self, bin: &Path) -> Result<Backends> {
        Ok(Backends {
            stable: backend::start(&self.stable, bin, Version::Stable)?,
            canary: backend::start(&self.canary, bin, Version::Canary)?,
        })
    }

    /// Starts etcd on the fabric (a fresh data directory) and waits until it serves.
    pub fn start_etcd(&self) -> Result<Etcd> {
        let dir = log_dir().join(format!("etcd-{}", self.fabric.name()));
        let _ = std::fs::remove_dir_all(&dir);
        let etcd = Etcd {
            child: std::sync::Mutex::new(None),
            dir,
            tls: None,
        };
        etcd.start(&self.fabric)?;
        Ok(etcd)
    }

    /// [`FleetLab::start_etcd`] serving TLS only, to clients with a certificate of
    /// `certs`' CA (`--client-cert-auth`), as the DaemonSet's etcd does.
    pub fn start_etcd_tls(&self, certs: &FleetCerts) -> Result<Etcd> {
        let dir = log_dir().join(format!("etcd-{}", self.fabric.name()));
        let _ = std::fs::remove_dir_all(&dir);
        let etcd = Etcd {
            child: std::sync::Mutex::new(None),
            dir,
            tls: Some(certs.dir.clone()),
        };
        etcd.start(&self.fabric)?;
        Ok(etcd)
    }

    /// [`FleetLab::start_agent`] against the TLS etcd, with node `i`'s own client
    /// certificate.
    pub fn start_agent_tls(
        &self,
        i: usize,
        services: &str,
        files: &[(&str, &str)],
        lease_s: u64,
        extra_args: &[&str],
        certs: &FleetCerts,
    ) -> Result<Agent> {
        let node = format!("n{}", i + 1);
        let text = format!(
            "node_name = \"{node}\"\nmetrics_listen = \"{}\"\n[fleet]\netcd = [\"https://{ETCD_V4}:2379\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nlease = {lease_s}\n{services}",
            probe_addr(i),
            certs.ca().display(),
            certs.cert(&node).display(),
            certs.key(&node).display(),
        );
        Agent::start_with_files(&self.nodes[i], &text, files, extra_args)
    }

    /// Starts node `i`'s agent (node name `n{i+1}`) with `services`, joined to the
    /// fleet with a `lease_s` lease.
    pub fn start_agent(
        &self,
        i: usize,
        services: &str,
        files: &[(&str, &str)],
        lease_s: u64,
        extra_args: &[&str],
    ) -> Result<Agent> {
        self.start_agent_in(i, None, services, files, lease_s, extra_args)
    }

    /// [`FleetLab::start_agent`] with `[agent] region`.
    pub fn start_agent_in(
        &self,
        i: usize,
        region: Option<&str>,
        services: &str,
        files: &[(&str, &str)],
        lease_s: u64,
        extra_args: &[&str],
    ) -> Result<Agent> {
        let region = region.map_or_else(String::new, |r| format!("region = \"{r}\"\n"));
        let text = format!(
            "node_name = \"n{}\"\n{region}metrics_listen = \"{}\"\n[fleet]\netcd = [\"http://{ETCD_V4}:2379\"]\nlease = {lease_s}\n{services}",
            i + 1,
            probe_addr(i),
        );
        Agent::start_with_files(&self.nodes[i], &text, files, extra_args)
    }
}

/// Node `i`'s agent's /metrics, /healthz and /readyz (reached from its client).
pub fn probe_addr(i: usize) -> std::net::SocketAddr {
    std::net::SocketAddr::new(node_client_v4(i).into(), 9464)
}

/// `[[service]]` "web" for the fleet lab: VIP_V4:80 over both backends' HTTP port.
pub fn fleet_service(extra: &str) -> String {
    lab_service("web", 80, backend::HTTP_PORT, extra)
}

/// A real etcd (Debian's `etcd-server`) on the fabric.
pub struct Etcd {
    child: std::sync::Mutex<Option<ChildGuard>>,
    pub dir: PathBuf,
    /// The certificates' directory when it serves TLS with client certificates.
    tls: Option<PathBuf>,
}

impl Etcd {
    fn start(&self, fabric: &NetNs) -> Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{ETCD_V4}:2379");
        let peer = format!("http://{ETCD_V4}:2380");
        let data = self.dir.to_string_lossy().into_owned();
        let initial = format!("lab={peer}");
        let mut args: Vec<&str> = vec![
            "--name",
            "lab",
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &initial,
        ];
        let files = self.tls.as_ref().map(|dir| {
            ["ca.pem", "etcd.pem", "etcd.key"].map(|f| dir.join(f).to_string_lossy().into_owned())
        });
        if let Some([ca, cert, key]) = &files {
            args.extend([
                "--client-cert-auth",
                "--trusted-ca-file",
                ca.as_str(),
                "--cert-file",
                cert.as_str(),
                "--key-file",
                key.as_str(),
            ]);
        }
        let mut child = fabric
            .spawn("etcd", &args)
            .context("starting etcd (cargo xtask bootstrap installs etcd-server)")?;
        child.wait_for_log("ready to serve client requests", Duration::from_secs(20))?;
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    }

    /// SIGKILL: etcd vanishes at once, as a crashed or partitioned store does.
    pub fn kill(&self) {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// SIGSTOP or SIGCONT: a stopped etcd accepts connections but answers nothing.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.pid() as i32, signal) };
        }
    }

    /// Starts it again on the same data directory.
    pub fn restart(&self, fabric: &NetNs) -> Result<()> {
        self.kill();
        self.start(fabric)
    }
}

/// Throwaway certificates for a TLS fleet, made with openssl: a CA, etcd's server
/// certificate (for [`ETCD_V4`]), a client certificate per node (`n1`, `n2`, …), and
/// `rogue`, a client certificate of another CA, which etcd must refuse.
pub struct FleetCerts {
    pub dir: PathBuf,
}

impl FleetCerts {
    pub fn generate(dir: &Path, nodes: usize) -> Result<FleetCerts> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let openssl = |args: &[&str]| -> Result<()> {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .context("running openssl (cargo xtask bootstrap installs it)")?;
            anyhow::ensure!(
                out.status.success(),
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        for ca in ["ca", "rogue-ca"] {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=canary-lab-{ca}"),
            ])?;
        }
        let issue = |name: &str, ca: &str, ext: &str| -> Result<()> {
            std::fs::write(dir.join(format!("{name}.ext")), ext)?;
            openssl(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ])?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ])
        };
        issue(
            "etcd",
            "ca",
            &format!("subjectAltName=IP:{ETCD_V4}\nextendedKeyUsage=serverAuth\n"),
        )?;
        for i in 0..nodes {
            issue(
                &format!("n{}", i + 1),
                "ca",
                "extendedKeyUsage=clientAuth\n",
            )?;
        }
        issue("rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")?;
        Ok(FleetCerts {
            dir: dir.to_path_buf(),
        })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
}
