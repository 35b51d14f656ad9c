//! The CLI's side of the HTTP API: requests, error messages and output tables.

use std::fmt::Write;

use anyhow::{anyhow, bail, Context};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;

use shoal_api::{
    AllocView, DeployView, DrainView, ErrorView, EventView, KvView, LogsView, NodeView, PsView,
    ServiceView, VersionView,
};

/// Output format of client commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable table.
    Table,
    /// JSON for scripts.
    Json,
}

/// The API token of this process's clients (`--token-file`), set once at start.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the API token every [`Client`] of this process sends (from `--token-file`).
pub fn set_token(token: String) {
    let _ = TOKEN.set(token);
}

/// The token to send: `--token-file`, else `$SHOAL_TOKEN`.
fn token() -> Option<String> {
    TOKEN
        .get()
        .cloned()
        .or_else(|| std::env::var("SHOAL_TOKEN").ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// A client for one agent's API.
pub struct Client {
    base: String,
    http: reqwest::Client,
}

/// A failed request whose answer was an error from the agent.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    /// HTTP status.
    pub status: u16,
    /// The agent's message.
    pub message: String,
}

impl Client {
    /// A client for `api` (`http://host:port`; the scheme may be omitted).
    pub fn new(api: &str) -> anyhow::Result<Self> {
        let base = if api.contains("://") {
            api.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", api.trim_end_matches('/'))
        };
        if !base.starts_with("http://") {
            bail!("--api must be an http:// address, got {api:?}");
        }
        let mut headers = reqwest::header::HeaderMap::new();
        // Marks requests as the CLI's: the agent refuses mutations without it that a
        // web page could forge.
        headers.insert(
            crate::agent::http_guard::CLIENT_HEADER,
            reqwest::header::HeaderValue::from_static("1"),
        );
        if let Some(t) = token() {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .context("the API token contains characters a header cannot carry")?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .default_headers(headers)
            .build()
            .context("building the HTTP client")?;
        Ok(Client { base, http })
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let body = resp.bytes().await.context("reading the agent's answer")?;
        if status != StatusCode::OK {
            return Err(agent_error(status, &body));
        }
        serde_json::from_slice(&body).context("the agent's answer is not the expected JSON")
    }

    /// `POST /v1/images`: starts a push; the answer streams progress lines.
    pub async fn image_push(
        &self,
        reference: &str,
        to: Option<&str>,
        replace: bool,
    ) -> anyhow::Result<reqwest::Response> {
        let req = self
            .http
            .post(format!("{}/v1/images", self.base))
            // A push of several GB takes as long as it takes; progress lines keep coming.
            .timeout(std::time::Duration::from_secs(24 * 3600))
            .json(&shoal_api::PushBody {
                reference: reference.to_string(),
                to: to.map(str::to_string),
                replace,
            });
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        if status != StatusCode::OK {
            let body = resp.bytes().await.context("reading the agent's answer")?;
            return Err(agent_error(status, &body));
        }
        Ok(resp)
    }

    /// `GET /v1/images`.
    pub async fn images(&self) -> anyhow::Result<Vec<shoal_api::ImageView>> {
        self.send(self.http.get(format!("{}/v1/images", self.base)))
            .await
    }

    /// `DELETE /v1/images/<reference>`.
    pub async fn image_rm(&self, reference: &str) -> anyhow::Result<shoal_api::ImageRemoved> {
        self.send(
            self.http
                .delete(format!("{}/v1/images/{reference}", self.base)),
        )
        .await
    }

    /// `POST /v1/pulls`: the agent's engine gets the image from peers.
    pub async fn image_pull(&self, reference: &str) -> anyhow::Result<serde_json::Value> {
        self.send(
            self.http
                .post(format!("{}/v1/pulls", self.base))
                .timeout(std::time::Duration::from_secs(24 * 3600))
                .json(&shoal_api::PullBody {
                    reference: reference.to_string(),
                }),
        )
        .await
    }

    fn unreachable(&self, e: &reqwest::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach the shoal agent at {}: {} (is `shoal agent` running there? set --api or SHOAL_API)",
            self.base,
            root_cause(e)
        )
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> anyhow::Result<Vec<NodeView>> {
        self.send(self.http.get(format!("{}/v1/nodes", self.base)))
            .await
    }

    /// `POST /v1/nodes/<name>/drain` (`on`) or `DELETE` it (undrain).
    pub async fn drain(&self, node: &str, on: bool) -> anyhow::Result<DrainView> {
        let url = format!("{}/v1/nodes/{node}/drain", self.base);
        let req = if on {
            self.http.post(url)
        } else {
            self.http.delete(url)
        };
        self.send(req).await
    }

    /// `POST /v1/nodes/<name>/forget`.
    pub async fn forget(&self, node: &str) -> anyhow::Result<serde_json::Value> {
        self.send(
            self.http
                .post(format!("{}/v1/nodes/{node}/forget", self.base)),
        )
        .await
    }

    /// `GET /v1/nodes/<name>/drain`.
    pub async fn drain_status(&self, node: &str) -> anyhow::Result<DrainView> {
        self.send(
            self.http
                .get(format!("{}/v1/nodes/{node}/drain", self.base)),
        )
        .await
    }

    /// `POST /v1/services?file=`: deploy a spec (TOML text).
    pub async fn deploy(&self, file: &str, text: String) -> anyhow::Result<DeployView> {
        let req = self
            .http
            .post(format!("{}/v1/services", self.base))
            .query(&[("file", file)])
            .body(text);
        self.send(req).await
    }

    /// `GET /v1/services`.
    pub async fn services(&self) -> anyhow::Result<Vec<ServiceView>> {
        self.send(self.http.get(format!("{}/v1/services", self.base)))
            .await
    }

    /// `GET /v1/events[?service=]`: scale decisions, newest first.
    pub async fn events(&self, service: Option<&str>) -> anyhow::Result<Vec<EventView>> {
        let mut req = self.http.get(format!("{}/v1/events", self.base));
        if let Some(s) = service {
            req = req.query(&[("service", s)]);
        }
        self.send(req).await
    }

    /// `GET /v1/allocs[?node=N]`: every allocation of the cluster.
    pub async fn allocs(&self, node: Option<&str>) -> anyhow::Result<Vec<AllocView>> {
        let mut req = self.http.get(format!("{}/v1/allocs", self.base));
        if let Some(n) = node {
            req = req.query(&[("node", n)]);
        }
        self.send(req).await
    }

    /// `GET /v1/services/<name>`.
    pub async fn ps(&self, name: &str) -> anyhow::Result<PsView> {
        self.send(self.http.get(format!("{}/v1/services/{name}", self.base)))
            .await
    }

    /// `POST /v1/services/<name>/scale`.
    pub async fn scale(&self, name: &str, replicas: u32) -> anyhow::Result<DeployView> {
        let req = self
            .http
            .post(format!("{}/v1/services/{name}/scale", self.base))
            .json(&shoal_api::ScaleBody { replicas });
        self.send(req).await
    }

    /// `GET /v1/services/<name>/history`.
    pub async fn history(&self, name: &str) -> anyhow::Result<Vec<VersionView>> {
        self.send(
            self.http
                .get(format!("{}/v1/services/{name}/history", self.base)),
        )
        .await
    }

    /// `POST /v1/services/<name>/rollback`.
    pub async fn rollback(&self, name: &str, to: Option<u64>) -> anyhow::Result<DeployView> {
        let req = self
            .http
            .post(format!("{}/v1/services/{name}/rollback", self.base))
            .json(&shoal_api::RollbackBody { to });
        self.send(req).await
    }

    /// `DELETE /v1/services/<name>`.
    pub async fn rm(&self, name: &str) -> anyhow::Result<DeployView> {
        self.send(
            self.http
                .delete(format!("{}/v1/services/{name}", self.base)),
        )
        .await
    }

    /// `GET /v1/services/<name>/logs`.
    pub async fn logs(
        &self,
        name: &str,
        slot: Option<u32>,
        tail: Option<usize>,
        offset: Option<u64>,
    ) -> anyhow::Result<Vec<LogsView>> {
        let mut q = Vec::new();
        if let Some(o) = offset {
            q.push(("offset", o.to_string()));
        }
        if let Some(s) = slot {
            q.push(("slot", s.to_string()));
        }
        if let Some(t) = tail {
            q.push(("tail", t.to_string()));
        }
        let req = self
            .http
            .get(format!("{}/v1/services/{name}/logs", self.base))
            .query(&q);
        self.send(req).await
    }

    /// `PUT /v1/kv/<key>`.
    pub async fn kv_put(&self, key: &str, value: &str) -> anyhow::Result<KvView> {
        let url = format!("{}/v1/kv/{}", self.base, key);
        self.send(self.http.put(url).body(value.to_string())).await
    }

    /// `GET /v1/kv/<key>`.
    pub async fn kv_get(&self, key: &str) -> anyhow::Result<KvView> {
        self.send(self.http.get(format!("{}/v1/kv/{}", self.base, key)))
            .await
    }

    /// `GET /v1/kv?prefix=[&internal=true]`.
    pub async fn kv_list(&self, prefix: &str, internal: bool) -> anyhow::Result<Vec<KvView>> {
        let req = self
            .http
            .get(format!("{}/v1/kv", self.base))
            .query(&[("prefix", prefix)])
            .query(&[("internal", internal)]);
        self.send(req).await
    }

    /// `POST /v1/plugins`: upload and bind a plugin.
    pub async fn plugin_install(
        &self,
        kind: &str,
        name: Option<&str>,
        service: Option<&str>,
        wasm: Vec<u8>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut q = vec![("kind", kind)];
        if let Some(n) = name {
            q.push(("name", n));
        }
        if let Some(s) = service {
            q.push(("service", s));
        }
        let req = self
            .http
            .post(format!("{}/v1/plugins", self.base))
            .query(&q)
            .timeout(std::time::Duration::from_secs(120))
            .body(wasm);
        self.send(req).await
    }

    /// `GET /v1/plugins[?all=true]`.
    pub async fn plugin_list(&self, all: bool) -> anyhow::Result<Vec<serde_json::Value>> {
        let req = self
            .http
            .get(format!("{}/v1/plugins", self.base))
            .query(&[("all", all)]);
        self.send(req).await
    }

    /// `DELETE /v1/plugins/<kind>[?service=]`.
    pub async fn plugin_remove(
        &self,
        kind: &str,
        service: Option<&str>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut req = self.http.delete(format!("{}/v1/plugins/{kind}", self.base));
        if let Some(s) = service {
            req = req.query(&[("service", s)]);
        }
        self.send(req).await
    }

    /// `GET /v1/snapshot`: the scheduler's view of the cluster.
    pub async fn snapshot(&self) -> anyhow::Result<serde_json::Value> {
        self.send(self.http.get(format!("{}/v1/snapshot", self.base)))
            .await
    }

    /// `GET /v1/discover/<svc>`: one service's endpoints for the agent's node.
    pub async fn discover(&self, svc: &str) -> anyhow::Result<shoal_discovery::LookupView> {
        self.send(self.http.get(format!("{}/v1/discover/{svc}", self.base)))
            .await
    }

    /// `GET /v1/discover/<svc>/input`: what the discovery policy is given.
    pub async fn discover_input(&self, svc: &str) -> anyhow::Result<shoal_policy::DiscoveryInput> {
        self.send(
            self.http
                .get(format!("{}/v1/discover/{svc}/input", self.base)),
        )
        .await
    }

    /// `GET /v1/discover?index=&wait=`: every service's endpoints, once the catalog
    /// generation passes `index` (or `wait` runs out; 0 answers at once).
    pub async fn discover_all(
        &self,
        index: u64,
        wait: std::time::Duration,
    ) -> anyhow::Result<shoal_discovery::CatalogView> {
        let req = self
            .http
            .get(format!("{}/v1/discover", self.base))
            .query(&[
                ("index", index.to_string()),
                ("wait", format!("{}ms", wait.as_millis())),
            ])
            .timeout(wait + std::time::Duration::from_secs(10));
        self.send(req).await
    }

    /// `DELETE /v1/kv/<key>`.
    pub async fn kv_rm(&self, key: &str) -> anyhow::Result<serde_json::Value> {
        self.send(self.http.delete(format!("{}/v1/kv/{}", self.base, key)))
            .await
    }
}

/// The agent's error answer (`{"error": …}`, or the body as text) as an error.
fn agent_error(status: StatusCode, body: &[u8]) -> anyhow::Error {
    let message = serde_json::from_slice::<ErrorView>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    AgentError {
        status: status.as_u16(),
        message,
    }
    .into()
}

/// The innermost error's message (what actually went wrong).
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn bytes_human(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = b as f64;
    if b >= GIB {
        format!("{:.1}G", b / GIB)
    } else {
        format!("{:.0}M", b / MIB)
    }
}

/// `YYYY-MM-DD HH:MM:SS` UTC of a ms timestamp.
pub fn clock_text(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rest / 3600,
        (rest / 60) % 60,
        rest % 60
    )
}

/// `s` with control characters (ANSI escapes, NUL, newlines…) shown as escapes,
/// so text from the cluster can never drive the terminal or break a table.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    escape(s, false)
}

/// Like [`printable`], but newlines and tabs are kept (multi-line values).
pub fn printable_text(s: &str) -> std::borrow::Cow<'_, str> {
    escape(s, true)
}

fn escape(s: &str, keep_lines: bool) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_control() && !(keep_lines && (c == '\n' || c == '\t'));
    if !s.chars().any(bad) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if !bad(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Renders rows as a left-aligned table with a header. Cells are escaped with
/// [`printable`]; any cell length and any row length work (missing cells are empty).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = rows
        .iter()
        .map(Vec::len)
        .chain([header.len()])
        .max()
        .unwrap_or(0);
    let cell = |r: &[String], i: usize| -> String {
        r.get(i)
            .map(|c| printable(c).into_owned())
            .unwrap_or_default()
    };
    let header: Vec<String> = (0..cols)
        .map(|i| header.get(i).copied().unwrap_or("").to_string())
        .collect();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| (0..cols).map(|i| cell(r, i)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &body {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push_str(c);
            if i + 1 < cells.len() {
                // Padded by hand: format widths are limited to u16, cells are not.
                let pad = widths[i] - c.chars().count() + 2;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, &header);
    for r in &body {
        line(&mut out, r);
    }
    out
}

/// The `shoal nodes` table.
pub fn nodes_table(nodes: &[NodeView]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let r = n.resources;
            vec![
                n.name.clone(),
                n.addr.clone(),
                if n.draining {
                    format!("{},draining", n.status)
                } else {
                    n.status.clone()
                },
                r.map_or("-".into(), |r| r.cpus.to_string()),
                r.map_or("-".into(), |r| {
                    format!(
                        "{}/{}",
                        bytes_human(r.memory_free_bytes),
                        bytes_human(r.memory_bytes)
                    )
                }),
                r.map_or("-".into(), |r| bytes_human(r.disk_free_bytes)),
                n.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "NAME",
            "ADDRESS",
            "STATUS",
            "CPUS",
            "MEM FREE/TOTAL",
            "DISK FREE",
            "LABELS",
        ],
        &rows,
    );
    for n in nodes {
        if let Some(note) = &n.note {
            let _ = writeln!(out, "{}: {}", printable(&n.name), printable(note));
        }
    }
    out
}

/// The `shoal plugin ls` table.
pub fn plugins_table(rows: &[serde_json::Value]) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let hash = s(&r["hash"]);
            vec![
                s(&r["agent"]),
                s(&r["kind"]),
                r["service"].as_str().unwrap_or("(default)").to_string(),
                s(&r["name"]),
                hash.chars().take(12).collect(),
                s(&r["state"]),
                r["failures"].as_u64().unwrap_or(0).to_string(),
            ]
        })
        .collect();
    table(
        &[
            "AGENT", "KIND", "SERVICE", "NAME", "HASH", "STATE", "FAILURES",
        ],
        &rows,
    )
}

/// The `shoal kv ls` table.
pub fn kv_table(entries: &[KvView]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| vec![e.key.clone(), e.value.clone(), e.writer.clone()])
        .collect();
    table(&["KEY", "VALUE", "WRITER"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz    w\n");
    }

    #[test]
    fn tables_take_any_cell_and_escape_control_characters() {
        // Format widths are limited to u16: a 70,000-character cell used to panic.
        let long = "v".repeat(70_000);
        let t = table(&["K", "V"], &[vec!["k".into(), long.clone()]]);
        assert!(t.contains(&long));
        // Rows longer or shorter than the header.
        let t = table(&["A"], &[vec!["1".into(), "2".into()], vec![]]);
        assert_eq!(t.lines().count(), 3);
        let t = table(&["KEY"], &[vec!["a\u{1b}[31mred\0\nb\u{7f}\u{85}".into()]]);
        assert!(t.contains("a\\x1b[31mred\\0\\nb\\x7f\\x85"), "{t}");
        assert!(!t.contains('\u{1b}'));
        assert_eq!(printable_text("a\nb\t\u{1b}"), "a\nb\t\\x1b");
    }

    #[test]
    fn api_address_forms() {
        assert!(Client::new("127.0.0.1:7101").is_ok());
        assert!(Client::new("http://127.0.0.1:7101/").is_ok());
        let err = Client::new("https://x").err().unwrap();
        assert!(err.to_string().contains("http://"), "{err}");
    }
}
