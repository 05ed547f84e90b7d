//! Outgoing webhooks (stage gates, alerts): one JSON POST over plain HTTP/1.1.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request, Uri};
use hyper_util::rt::TokioIo;

/// POSTs `body` to `url` and returns the response status code. Only `http://` URLs:
/// the agent talks to in-cluster hooks; TLS would be a sidecar's job.
pub async fn post_json(url: &str, body: &serde_json::Value, timeout: Duration) -> Result<u16> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("webhook URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("webhook {url}: only http:// URLs are supported");
    }
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("webhook {url}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let call = async {
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let request = Request::post(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header("host", format!("{host}:{port}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        // Drain so the server sees a complete exchange.
        let _ = response.into_body().collect().await;
        anyhow::Ok(status)
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| anyhow!("webhook {url}: no answer within {timeout:?}"))?
}
