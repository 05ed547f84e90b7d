//! Outgoing HTTP from the agent (stage gates, alerts, Prometheus queries): plain
//! HTTP/1.1, one request per connection.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request, Uri};
use hyper_util::rt::TokioIo;

/// Largest reply body read from a webhook or Prometheus: a gate's answer is its
/// status, a PromQL reply of one number is a few hundred bytes; a larger body is an
/// error rather than memory the agent gives away.
pub const MAX_REPLY: usize = 1024 * 1024;

/// `url` as it may be shown, logged or stored: scheme, host and port only. Gate and
/// alert URLs often carry a token (`user:pass@`, a path or a query): those never
/// leave the config file and the agent's memory.
pub fn redact_url(url: &str) -> String {
    match url.parse::<Uri>() {
        Ok(uri) => match (uri.scheme_str(), uri.host()) {
            (Some(scheme), Some(host)) => match uri.port_u16() {
                Some(port) => format!("{scheme}://{host}:{port}"),
                None => format!("{scheme}://{host}"),
            },
            _ => "(URL without a host)".into(),
        },
        Err(_) => "(unparsable URL)".into(),
    }
}

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

/// GETs `path` from the HTTP server at `addr` (a backend's health check) and returns
/// the status; the caller bounds the time.
pub async fn get_status(addr: std::net::SocketAddr, path: &str) -> Result<u16> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (status, _) = exchange(stream, &addr.to_string(), path, None).await?;
    Ok(status)
}

async fn request(
    url: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<(u16, Bytes)> {
    let shown = redact_url(url);
    let uri: Uri = url
        .parse()
        .map_err(|e| anyhow!("webhook URL {shown}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("{shown}: only http:// URLs are supported");
    }
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("webhook {shown}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let call = async {
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        exchange(stream, &format!("{host}:{port}"), path, body).await
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| anyhow!("{shown}: no answer within {timeout:?}"))?
        .with_context(|| shown.clone())
}

/// One request and its reply over `io`, the reply body capped at [`MAX_REPLY`].
async fn exchange(
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    host: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, Bytes)> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let builder = match body {
        Some(_) => Request::post(path).header("content-type", "application/json"),
        None => Request::get(path),
    };
    let payload = match body {
        Some(b) => Bytes::from(serde_json::to_vec(b)?),
        None => Bytes::new(),
    };
    let request = builder.header("host", host).body(Full::new(payload))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = http_body_util::Limited::new(response.into_body(), MAX_REPLY)
        .collect()
        .await
        .map_err(|e| anyhow!("reply body: {e} (at most {MAX_REPLY} bytes are read)"))?
        .to_bytes();
    Ok((status, bytes))
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server on the other end of an in-memory pipe answering with `body`.
    async fn answer(body_len: usize) -> Result<(u16, Bytes)> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut head = [0u8; 1024];
            let _ = server.read(&mut head).await;
            let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {body_len}\r\n\r\n");
            server.write_all(reply.as_bytes()).await?;
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = body_len;
            while left > 0 {
                let n = left.min(chunk.len());
                server.write_all(&chunk[..n]).await?;
                left -= n;
            }
            std::io::Result::Ok(())
        });
        exchange(client, "hook:80", "/", None).await
    }

    #[test]
    fn shown_urls_keep_only_scheme_host_and_port() {
        assert_eq!(
            redact_url("http://user:s3cret@hooks.example:8080/approve/t0ken?key=abc"),
            "http://hooks.example:8080"
        );
        assert_eq!(
            redact_url("http://hooks.example/x?token=1"),
            "http://hooks.example"
        );
        assert_eq!(redact_url("/approve?token=1"), "(URL without a host)");
        assert_eq!(redact_url("http://a b"), "(unparsable URL)");
    }

    #[tokio::test]
    async fn reply_bodies_are_read_up_to_the_cap_only() {
        let (status, body) = answer(MAX_REPLY).await.unwrap();
        assert_eq!((status, body.len()), (200, MAX_REPLY));
        let e = answer(MAX_REPLY + 1).await.unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
        // A huge declared body is refused, not read.
        let e = answer(64 * MAX_REPLY).await.unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }
}
