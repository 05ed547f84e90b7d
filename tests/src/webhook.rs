//! A webhook receiver for tests: answers every POST with 200 and records the bodies.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
};

use anyhow::Result;

use crate::NetNs;

/// Bodies received so far, shared with the accept thread.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<String>>>);

impl Received {
    pub fn bodies(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// Listens on `addr` inside `ns` and approves (HTTP 200) up to 50 requests.
pub fn approving_webhook(ns: &NetNs, addr: SocketAddr) -> Result<Received> {
    let listener = ns.enter(|| Ok(TcpListener::bind(addr)?))?;
    let received = Received::default();
    let sink = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(50).flatten() {
            let mut reader = BufReader::new(&stream);
            let (mut len, mut line) = (0, String::new());
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_ok() {
                sink.0
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
            }
            let _ = (&stream).write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        }
    });
    Ok(received)
}
