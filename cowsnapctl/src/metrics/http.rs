//! The HTTP side of `cowsnapctl metrics --listen`: `GET /metrics` and nothing else.
//!
//! Design notes
//! - Bounded whatever clients do: one accept thread hands connections to a queue of
//!   [`QUEUE`] and [`WORKERS`] worker threads; a connection that finds the queue full
//!   is closed at once. A worker reads one request head (at most [`MAX_HEAD`] bytes,
//!   within [`HEAD_DEADLINE`] in all, so a client that trickles bytes cannot hold it),
//!   answers it and closes the connection (`Connection: close`; Prometheus opens a
//!   connection per scrape or reuses none that is closed). At most
//!   WORKERS + QUEUE connections are held, and 2 + WORKERS threads (plus a scrape's
//!   short-lived daemon queries).
//! - The request head is parsed by `httparse`. `GET /metrics` (any query string) →
//!   200 with the exposition; another path → 404; another method → 405 with
//!   `Allow: GET`; a malformed head → 400; an oversized one → 431. A request body is
//!   never read.
//! - tiny_http was considered and not used: it starts a thread per open connection and
//!   sets no read timeout, so idle or slow clients grow its threads without bound.

use crossbeam_channel::{bounded, TrySendError};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Worker threads answering requests.
pub const WORKERS: usize = 2;
/// Accepted connections waiting for a worker.
pub const QUEUE: usize = 16;
/// Longest request head.
pub const MAX_HEAD: usize = 8 << 10;
/// Time a client has to send its request head.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The Prometheus text format's content type.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What a request gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`.
    Metrics,
    /// Another path.
    NotFound,
    /// Another method.
    MethodNotAllowed,
    /// Not an HTTP request head.
    BadRequest,
    /// A head longer than [`MAX_HEAD`].
    TooLarge,
}

/// Route a complete or partial head: `None` while more bytes are needed.
pub fn route(head: &[u8]) -> Option<Route> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if head.len() >= MAX_HEAD => return Some(Route::TooLarge),
        Ok(httparse::Status::Partial) => return None,
        Err(httparse::Error::TooManyHeaders) => return Some(Route::TooLarge),
        Err(_) => return Some(Route::BadRequest),
    }
    if req.method != Some("GET") {
        return Some(Route::MethodNotAllowed);
    }
    let path = req.path.unwrap_or("");
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    Some(if path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    })
}

/// Read a request head within the deadline; `None` when the client went away or
/// took too long.
fn read_head(s: &mut TcpStream) -> Option<Route> {
    let t0 = Instant::now();
    let mut buf = Vec::with_capacity(1024);
    let mut piece = [0u8; 1024];
    loop {
        let left = HEAD_DEADLINE.checked_sub(t0.elapsed())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        let n = s.read(&mut piece).ok()?;
        if n == 0 {
            return None;
        }
        let room = MAX_HEAD - buf.len();
        buf.extend_from_slice(&piece[..n.min(room)]);
        if let Some(r) = route(&buf) {
            return Some(r);
        }
    }
}

fn respond(s: &mut TcpStream, status: &str, extra: &str, ctype: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
    let _ = s.flush();
}

fn serve_conn(mut s: TcpStream, exposition: &(dyn Fn() -> String + Send + Sync)) {
    let Some(r) = read_head(&mut s) else {
        return;
    };
    let text = "text/plain; charset=utf-8";
    match r {
        Route::Metrics => {
            let body = exposition();
            respond(&mut s, "200 OK", "", CONTENT_TYPE, body.as_bytes());
        }
        Route::NotFound => respond(
            &mut s,
            "404 Not Found",
            "",
            text,
            b"only /metrics is served\n",
        ),
        Route::MethodNotAllowed => respond(
            &mut s,
            "405 Method Not Allowed",
            "Allow: GET\r\n",
            text,
            b"only GET is served\n",
        ),
        Route::BadRequest => respond(&mut s, "400 Bad Request", "", text, b"bad request\n"),
        Route::TooLarge => respond(
            &mut s,
            "431 Request Header Fields Too Large",
            "",
            text,
            b"request head too large\n",
        ),
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// Serve `listener` until the process ends: `exposition` makes each response body.
pub fn serve(
    listener: TcpListener,
    exposition: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<()> {
    let (tx, rx) = bounded::<TcpStream>(QUEUE);
    for i in 0..WORKERS {
        let rx = rx.clone();
        let f = exposition.clone();
        std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || {
                for s in rx {
                    serve_conn(s, &*f);
                }
            })?;
    }
    let mut dropped = 0u64;
    let mut last_note = Instant::now() - Duration::from_secs(60);
    for conn in listener.incoming() {
        match conn {
            Ok(s) => match tx.try_send(s) {
                Ok(()) => {}
                Err(TrySendError::Full(s)) => {
                    drop(s);
                    dropped += 1;
                    if last_note.elapsed() >= Duration::from_secs(10) {
                        log::warn!(
                            "metrics: {dropped} connection(s) closed unanswered: all {WORKERS} workers busy and {QUEUE} waiting"
                        );
                        last_note = Instant::now();
                        dropped = 0;
                    }
                }
                Err(TrySendError::Disconnected(_)) => {
                    return Err(std::io::Error::other("the HTTP workers stopped"))
                }
            },
            Err(e) => {
                log::warn!("metrics: accept: {e}");
                // e.g. EMFILE: do not spin
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Route::Metrics)
        );
        assert_eq!(r("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Some(Route::Metrics));
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), Some(Route::NotFound));
        assert_eq!(r("GET /metricsx HTTP/1.1\r\n\r\n"), Some(Route::NotFound));
        assert_eq!(
            r("POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Route::MethodNotAllowed)
        );
        assert_eq!(
            r("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Some(Route::MethodNotAllowed)
        );
        assert_eq!(r("GET /metrics HTTP/1.1\r\nHost"), None, "partial");
        assert_eq!(r("\x01\x02 garbage\r\n\r\n"), Some(Route::BadRequest));
        let big = format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(route(&big.as_bytes()[..MAX_HEAD]), Some(Route::TooLarge));
        let many: String = (0..100).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            r(&format!("GET /metrics HTTP/1.1\r\n{many}\r\n")),
            Some(Route::TooLarge)
        );
    }

    /// The response, or "" when the server closed the connection unanswered.
    fn get(addr: std::net::SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut out = String::new();
        if s.write_all(req.as_bytes()).is_ok() {
            let _ = s.read_to_string(&mut out);
        }
        out
    }

    #[test]
    fn the_server_answers_and_stays_bounded() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c2 = calls.clone();
        std::thread::spawn(move || {
            serve(
                l,
                Arc::new(move || {
                    c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    "up 1\n".to_string()
                }),
            )
        });
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nup 1\n"), "{ok}");
        assert!(get(addr, "GET /x HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        let r = get(addr, "PUT /metrics HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 405") && r.contains("Allow: GET"),
            "{r}"
        );

        // Idle clients take the workers and fill the queue; the next ones are closed
        // unanswered.
        let idle: Vec<TcpStream> = (0..WORKERS + QUEUE + 8)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let _ = extra.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        let mut out = Vec::new();
        let t0 = Instant::now();
        let _ = extra.read_to_end(&mut out);
        assert!(
            out.is_empty() || t0.elapsed() >= HEAD_DEADLINE / 2,
            "served at once while every worker was busy: {}",
            String::from_utf8_lossy(&out)
        );
        // once the idle clients go away, requests are served again at once
        drop(idle);
        let t0 = Instant::now();
        loop {
            let r = get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
            if r.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(t0.elapsed() < 2 * HEAD_DEADLINE, "never served again");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(t0.elapsed() < HEAD_DEADLINE, "{:?}", t0.elapsed());
        assert!(calls.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    }
}
