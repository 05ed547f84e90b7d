//! A routed service's backend connection pools (hyper-util's client), per version and
//! protocol, with a connector that counts the connections each version opens.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Result;
use hyper::body::Incoming;
use hyper::{Uri, Version as HttpVersion};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::counts::Counts;
use crate::config::BackendProtocol;

/// A backend that does not accept within this time gets the client a 502.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle pooled backend connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(60);

type Pool = Client<Counted, Incoming>;

/// The service's backend connection pools: per version, HTTP/1.1 and h2c.
pub(super) struct Clients {
    pub pools: [[Pool; 2]; 2],
    protocol: BackendProtocol,
}

impl Clients {
    pub fn new(counts: &Arc<Counts>, protocol: BackendProtocol) -> Result<Self> {
        let pool = |version: usize, h2: bool| {
            let mut http = HttpConnector::new();
            http.set_connect_timeout(Some(CONNECT_TIMEOUT));
            http.set_nodelay(true);
            let connector = Counted {
                http,
                counts: counts.clone(),
                version,
            };
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(POOL_IDLE)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(h2);
            b.build(connector)
        };
        Ok(Self {
            pools: [
                [pool(0, false), pool(0, true)],
                [pool(1, false), pool(1, true)],
            ],
            protocol,
        })
    }

    /// Whether a request of `client_version` goes to the backend over h2c.
    pub fn h2(&self, client_version: HttpVersion) -> bool {
        match self.protocol {
            BackendProtocol::Auto => client_version == HttpVersion::HTTP_2,
            BackendProtocol::Http1 => false,
            BackendProtocol::H2c => true,
        }
    }
}

/// The HTTP connector, counting the backend connections it opens per version (the
/// `conn_new` and `conn_failed` of the analysis).
#[derive(Clone)]
pub(super) struct Counted {
    http: HttpConnector,
    counts: Arc<Counts>,
    version: usize,
}

impl tower_service::Service<Uri> for Counted {
    type Response = TokioIo<TcpStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let v = &self.counts.versions[self.version];
        v.connections.fetch_add(1, Ordering::Relaxed);
        let counts = self.counts.clone();
        let version = self.version;
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let conn = connecting.await?;
            counts.versions[version]
                .connected
                .fetch_add(1, Ordering::Relaxed);
            Ok(conn)
        })
    }
}
