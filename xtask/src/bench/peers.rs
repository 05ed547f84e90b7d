//! The other ways to serve the same split, set up on a fresh lab: nginx backends (so
//! the backends are not what limits the paths being compared), iptables `statistic`
//! DNAT, nginx `stream` with `split_clients`, and HAProxy in TCP mode; for request
//! routing, nginx `http` (`map` + `split_clients`, `grpc_pass` for h2c) and HAProxy in
//! HTTP mode (h1 and h2). Every address is in the lab's 198.18.0.0/15 range, inside the
//! lab's own namespaces.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use canary_lab::{
    topology::{CANARY_V4, STABLE_V4},
    ChildGuard, NetNs, Topology,
};

/// Backend port of the nginx backends (the lab's usual backend port).
pub const BACKEND_PORT: u16 = canary_lab::backend::HTTP_PORT;
/// Their h2c (prior knowledge) port, as the lab backend's.
pub const H2C_BACKEND_PORT: u16 = canary_lab::backend::H2C_PORT;
/// Port of the routing paths' h2c listeners (HTTP/1 on 80).
pub const H2C_PORT: u16 = 81;
/// An empty gRPC message (uncompressed, length 0): the h2c load's request body.
pub const GRPC_EMPTY: &str = "grpc-empty.bin";
/// Addresses on the node for the userspace proxies and the iptables split; the client
/// routes all of 198.19.0.0/16 through the node.
pub const IPTABLES_VIP: &str = "198.19.0.20";
pub const NGINX_VIP: &str = "198.19.0.30";
pub const HAPROXY_VIP: &str = "198.19.0.40";
/// Debian builds nginx's `stream` as a module (package libnginx-mod-stream).
const STREAM_MODULE: &str = "load_module /usr/lib/nginx/modules/ngx_stream_module.so;";
/// Size of the bulk-transfer object.
pub const BULK_BYTES: usize = 1 << 20;

/// Scratch directory for configs, pid files and the bulk object; removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("canary-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("1m.bin"), vec![b'x'; BULK_BYTES])?;
        std::fs::write(dir.join(GRPC_EMPTY), [0u8; 5])?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Runs nginx in the foreground in `ns` with `body` after the `events` block (modules
/// must be loaded before it, so `modules` comes first).
fn nginx(
    ns: &NetNs,
    dir: &Path,
    name: &str,
    workers: &str,
    modules: &str,
    body: &str,
) -> Result<ChildGuard> {
    let text = format!(
        "{modules}\nworker_processes {workers};\ndaemon off;\npid {d}/{name}.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 8192; }}\n{body}\n",
        d = dir.display()
    );
    let conf = write(dir, &format!("{name}.conf"), &text)?;
    let prefix = dir.to_string_lossy().into_owned();
    let mut child = ns.spawn(
        "nginx",
        &["-p", &prefix, "-e", "stderr", "-c", &conf.to_string_lossy()],
    )?;
    wait_listening(ns, &mut child, name)?;
    Ok(child)
}

/// Waits until the child has a listening socket (nginx and HAProxy print nothing when
/// they are ready).
fn wait_listening(ns: &NetNs, child: &mut ChildGuard, what: &str) -> Result<()> {
    for _ in 0..100 {
        if ns
            .run(&["ss", "-Hltnp"])?
            .contains(&format!("pid={}", child.pid()))
        {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    anyhow::bail!("{what} did not start listening:\n{}", child.log())
}

/// nginx in the stable and canary namespaces: `/` answers a short body, `/1m` a 1 MiB
/// file, keep-alive without a request limit; on [`H2C_BACKEND_PORT`] (h2c) every call
/// is answered like a unary gRPC call (`application/grpc`, `grpc-status: 0` trailer).
/// One worker each: two backends, two cores.
pub fn start_backends(topo: &Topology, dir: &Path) -> Result<Vec<ChildGuard>> {
    let mut out = Vec::new();
    for (name, ns, addr) in [
        ("stable", &topo.stable, STABLE_V4),
        ("canary", &topo.canary, CANARY_V4),
    ] {
        let body = format!(
            "http {{ access_log off; keepalive_requests 100000000; keepalive_timeout 300s;\n\
             client_body_temp_path {d}/{name}-body; proxy_temp_path {d}/{name}-proxy;\n\
             fastcgi_temp_path {d}/{name}-fcgi; uwsgi_temp_path {d}/{name}-uwsgi; scgi_temp_path {d}/{name}-scgi;\n\
             server {{ listen {addr}:{BACKEND_PORT} backlog=4096;\n\
             location = / {{ return 200 \"{name}\\n\"; }}\n\
             location = /1m {{ alias {d}/1m.bin; }} }}
             server {{ listen {addr}:{H2C_BACKEND_PORT} http2 backlog=4096;
             location / {{ default_type application/grpc; add_trailer grpc-status 0;
             return 200 \"{name}\\n\"; }} }} }}",
            d = dir.display()
        );
        out.push(nginx(ns, dir, &format!("backend-{name}"), "1", "", &body)?);
    }
    Ok(out)
}

/// iptables on the node: 10 % of new connections to canary, the rest to stable.
pub fn iptables_split(topo: &Topology) -> Result<()> {
    for rule in [
        format!("-t nat -A PREROUTING -d {IPTABLES_VIP} -p tcp --dport 80 -m statistic --mode random --probability 0.1 -j DNAT --to-destination {CANARY_V4}:{BACKEND_PORT}"),
        format!("-t nat -A PREROUTING -d {IPTABLES_VIP} -p tcp --dport 80 -j DNAT --to-destination {STABLE_V4}:{BACKEND_PORT}"),
    ] {
        let mut args = vec!["iptables"];
        args.extend(rule.split(' '));
        topo.node.run(&args)?;
    }
    Ok(())
}

/// A node-local address for a userspace proxy to listen on.
fn own(topo: &Topology, addr: &str) -> Result<()> {
    topo.node
        .run(&["ip", "addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
    Ok(())
}

/// nginx `stream` on the node, `split_clients` 10 % to canary per connection, as many
/// workers as cores.
pub fn nginx_split(topo: &Topology, dir: &Path) -> Result<ChildGuard> {
    own(topo, NGINX_VIP)?;
    let body = format!(
        "stream {{ split_clients \"$remote_addr$remote_port\" $version {{ 10% canary; * stable; }}\n\
         upstream stable {{ server {STABLE_V4}:{BACKEND_PORT}; }}\n\
         upstream canary {{ server {CANARY_V4}:{BACKEND_PORT}; }}\n\
         server {{ listen {NGINX_VIP}:80 backlog=4096; proxy_pass $version; }} }}"
    );
    nginx(&topo.node, dir, "nginx-split", "auto", STREAM_MODULE, &body)
}

/// HAProxy on the node in TCP mode, weights 90/10, one thread per core.
pub fn haproxy_split(topo: &Topology, dir: &Path) -> Result<ChildGuard> {
    own(topo, HAPROXY_VIP)?;
    let conf = write(
        dir,
        "haproxy.cfg",
        &format!(
            "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 60s\n  timeout server 60s\n\nfrontend split\n  bind {HAPROXY_VIP}:80\n  \
             default_backend versions\n\nbackend versions\n  balance roundrobin\n  \
             server stable {STABLE_V4}:{BACKEND_PORT} weight 90\n  \
             server canary {CANARY_V4}:{BACKEND_PORT} weight 10\n"
        ),
    )?;
    let mut child = topo
        .node
        .spawn("haproxy", &["-db", "-f", &conf.to_string_lossy()])?;
    wait_listening(&topo.node, &mut child, "haproxy")?;
    Ok(child)
}

/// nginx `http` on the node deciding every request as the agent's proxy does:
/// `X-Canary: true` → canary (`map $http_x_canary`), else 10 % to canary
/// (`split_clients` on `$request_id`, a fresh value per request); upstream connections
/// kept alive (HTTP/1.1, `Connection` cleared), as many workers as cores. Responses are
/// buffered in memory only (`proxy_max_temp_file_size 0`: a 1 MiB body never goes to a
/// temp file). h2c on [`H2C_PORT`], the same decision, `grpc_pass` to the h2c backends.
pub fn nginx_routing(topo: &Topology, dir: &Path) -> Result<ChildGuard> {
    own(topo, NGINX_VIP)?;
    let body = format!(
        "http {{ access_log off; keepalive_requests 100000000; keepalive_timeout 300s;\n\
         client_body_temp_path {d}/route-body; proxy_temp_path {d}/route-proxy;\n\
         fastcgi_temp_path {d}/route-fcgi; uwsgi_temp_path {d}/route-uwsgi; scgi_temp_path {d}/route-scgi;\n\
         split_clients \"$request_id\" $split {{ 10% canary; * stable; }}\n\
         map $http_x_canary $pool {{ true canary; default $split; }}\n\
         upstream stable {{ server {STABLE_V4}:{BACKEND_PORT}; keepalive 64; keepalive_requests 100000000; }}\n\
         upstream canary {{ server {CANARY_V4}:{BACKEND_PORT}; keepalive 64; keepalive_requests 100000000; }}\n\
         upstream stable_h2 {{ server {STABLE_V4}:{H2C_BACKEND_PORT}; keepalive 64; keepalive_requests 100000000; }}\n\
         upstream canary_h2 {{ server {CANARY_V4}:{H2C_BACKEND_PORT}; keepalive 64; keepalive_requests 100000000; }}\n\
         server {{ listen {NGINX_VIP}:80 backlog=4096;\n\
         location / {{ proxy_pass http://$pool; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
         proxy_buffers 8 64k; proxy_busy_buffers_size 128k; proxy_max_temp_file_size 0; }} }}\n\
         server {{ listen {NGINX_VIP}:{H2C_PORT} http2 backlog=4096;\n\
         location / {{ grpc_pass grpc://${{pool}}_h2; }} }} }}",
        d = dir.display()
    );
    nginx(&topo.node, dir, "nginx-route", "auto", "", &body)
}

/// HAProxy on the node in HTTP mode, the same decision: `use_backend canary` when
/// `X-Canary` is `true`, else a backend of both versions weighted 90/10 (HTTP mode
/// balances each request); idle server connections shared between clients
/// (`http-reuse always`), one thread per core. h2c on [`H2C_PORT`] (`proto h2` both
/// sides).
pub fn haproxy_routing(topo: &Topology, dir: &Path) -> Result<ChildGuard> {
    own(topo, HAPROXY_VIP)?;
    let versions = |name: &str, port: u16, proto: &str| {
        format!(
            "backend {name}\n  balance roundrobin\n  \
             server stable {STABLE_V4}:{port}{proto} weight 90\n  \
             server canary {CANARY_V4}:{port}{proto} weight 10\n\n"
        )
    };
    let conf = write(
        dir,
        "haproxy-route.cfg",
        &format!(
            "global\n  maxconn 8000\n\ndefaults\n  mode http\n  http-reuse always\n  \
             timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
             frontend route\n  bind {HAPROXY_VIP}:80\n  \
             use_backend canary if {{ req.hdr(x-canary) -m str true }}\n  \
             default_backend versions\n\n\
             frontend route_h2\n  bind {HAPROXY_VIP}:{H2C_PORT} proto h2\n  \
             use_backend canary_h2 if {{ req.hdr(x-canary) -m str true }}\n  \
             default_backend versions_h2\n\n\
             {}{}\
             backend canary\n  server canary {CANARY_V4}:{BACKEND_PORT}\n\n\
             backend canary_h2\n  server canary {CANARY_V4}:{H2C_BACKEND_PORT} proto h2\n",
            versions("versions", BACKEND_PORT, ""),
            versions("versions_h2", H2C_BACKEND_PORT, " proto h2"),
        ),
    )?;
    let mut child = topo
        .node
        .spawn("haproxy", &["-db", "-f", &conf.to_string_lossy()])?;
    wait_listening(&topo.node, &mut child, "haproxy")?;
    Ok(child)
}
