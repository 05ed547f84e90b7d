//! Outgoing HTTP from the agent (stage gates, alerts, Prometheus queries): plain
//! HTTP/1.1, one request per connection.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request, Uri};
use hyper_util::rt::TokioIo;

/// POSTs `body` to `url` and returns the response status code. Only `http://` URLs:
/// the agent talks to in-cluster hooks; TLS would be a sidecar's job.
pub async fn post_json(url: &str, body: &serde_json::Value, timeout: Duration) -> Result<u16> {
    let (status, _) = request(url, Some(body), timeout).await?;
    Ok(status)
}

/// GETs `url` and returns the status and the body parsed as JSON.
pub async fn get_json(url: &str, timeout: Duration) -> Result<(u16, serde_json::Value)> {
    let (status, body) = request(url, None, timeout).await?;
    Ok((
        status,
        serde_json::from_slice(&body).with_context(|| format!("{url}: reply is not JSON"))?,
    ))
}

async fn request(
    url: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<(u16, Bytes)> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("webhook URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("{url}: only http:// URLs are supported");
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
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let builder = match body {
            Some(_) => Request::post(path).header("content-type", "application/json"),
            None => Request::get(path),
        };
        let payload = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let request = builder
            .header("host", format!("{host}:{port}"))
            .body(Full::new(payload))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, bytes))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| anyhow!("{url}: no answer within {timeout:?}"))?
}

/// Runs a PromQL instant query whose result is one number (e.g. `sum(...)`); `None`
/// when the query matches no series yet.
pub async fn prometheus_scalar(base: &str, query: &str, timeout: Duration) -> Result<Option<f64>> {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let url = format!(
        "{}/api/v1/query?query={encoded}",
        base.trim_end_matches('/')
    );
    let (status, reply) = get_json(&url, timeout).await?;
    if status != 200 || reply["status"] != "success" {
        bail!("PromQL {query:?}: HTTP {status}: {}", reply["error"]);
    }
    let result = &reply["data"]["result"];
    let Some(first) = result.as_array().and_then(|r| r.first()) else {
        return Ok(None);
    };
    let value = first["value"][1]
        .as_str()
        .ok_or_else(|| anyhow!("PromQL {query:?}: unexpected reply {reply}"))?;
    Ok(Some(value.parse().with_context(|| {
        format!("PromQL {query:?}: value {value:?}")
    })?))
}
