//! shoal-test-http: a tiny HTTP/1.0 server for shoal's tests, built as a static binary
//! (std only, no crates) and put into a `FROM scratch` image by `testutil`.
//!
//! Listens on 0.0.0.0:$PORT (default 8080) and answers
//!   GET /          -> $MESSAGE (default "hello from shoal-test-http")
//!   GET /healthz   -> ok
//!   GET /env/NAME  -> the value of env NAME, 404 if unset
//! With $EXIT_WITH set it prints a line and exits with that code at once.
//! Logs one line per request to stderr. Exits 0 on SIGTERM/SIGINT (as PID 1 in a
//! container the default action would be to ignore them).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn _exit(code: i32) -> !;
}

extern "C" fn on_term(_: i32) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { _exit(0) }
}

fn main() {
    // SAFETY: installing a handler that only calls _exit.
    unsafe {
        signal(15, on_term);
        signal(2, on_term);
    }
    if let Ok(code) = std::env::var("EXIT_WITH") {
        println!("shoal-test-http exiting with {code}");
        std::process::exit(code.trim().parse().unwrap_or(1));
    }
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8080);
    let listener = match TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("shoal-test-http: cannot listen on port {port}: {e}");
            std::process::exit(2);
        }
    };
    println!("shoal-test-http listening on port {port}");
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || handle(conn));
    }
}

fn handle(mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET", "/") => (
            "200 OK",
            std::env::var("MESSAGE").unwrap_or_else(|_| "hello from shoal-test-http".into()),
        ),
        ("GET", "/healthz") => ("200 OK", "ok".to_string()),
        ("GET", p) if p.starts_with("/env/") => match std::env::var(&p[5..]) {
            Ok(v) => ("200 OK", v),
            Err(_) => ("404 Not Found", "unset".to_string()),
        },
        _ => ("404 Not Found", "not found".to_string()),
    };
    eprintln!("{method} {path} -> {status}");
    let _ = write!(
        conn,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
}
