//! `shoal discover` and `shoal render`: discovery answers for people and for proxies.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_discovery::render::Template;
use shoal_discovery::{CatalogView, LookupView};

use crate::client::{printable, table, Client, Format};

/// Options of `shoal render`.
#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// The template (minijinja / Jinja2 syntax), e.g. examples/nginx/upstreams.conf.j2.
    pub template: PathBuf,
    /// File to write; replaced atomically (temp file + rename), only when it changes.
    #[arg(long)]
    pub out: PathBuf,
    /// Shell command run after the file changed (e.g. "nginx -s reload").
    #[arg(long)]
    pub exec: Option<String>,
    /// Keep running: render again whenever an endpoint changes.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: wait for MIN of quiet after a change, but at most MAX
    /// (`MIN[:MAX]`, e.g. 200ms:1s), so a burst of changes renders once.
    #[arg(long, default_value = "200ms:1s", value_parser = parse_wait)]
    pub wait: (Duration, Duration),
    /// Longest the --exec command may run before it is killed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub exec_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    shoal_orch::parse_duration_ms(s)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is not a duration like 500ms, 2s or 1m"))
}

fn parse_wait(s: &str) -> Result<(Duration, Duration), String> {
    let (min, max) = match s.split_once(':') {
        Some((a, b)) => (parse_duration(a)?, parse_duration(b)?),
        None => {
            let d = parse_duration(s)?;
            (d, d * 4)
        }
    };
    if max < min {
        return Err(format!("in --wait {s}, MAX must not be shorter than MIN"));
    }
    if max > Duration::from_secs(300) {
        return Err(format!("--wait {s}: MAX may be at most 5m"));
    }
    Ok((min, max))
}

/// `shoal discover SVC`.
pub async fn discover(api: &str, service: &str, output: Format) -> anyhow::Result<()> {
    let v = Client::new(api)?.discover(service).await?;
    if output == Format::Json {
        return crate::print_json(&v);
    }
    print!("{}", lookup_text(&v));
    Ok(())
}

fn lookup_text(v: &LookupView) -> String {
    let caller = &v.caller;
    let zone = caller
        .labels
        .get("zone")
        .map_or(String::new(), |z| format!(" (zone {})", printable(z)));
    let a = &v.answer;
    let mut out = format!(
        "{}: {} for {}{zone}, decided by {}\n",
        printable(&a.service),
        match a.endpoints.len() {
            0 => "no healthy endpoint".to_string(),
            1 => "1 endpoint".to_string(),
            n => format!("{n} endpoints"),
        },
        printable(&caller.node),
        printable(&a.decided_by),
    );
    if let Some(why) = &a.fallback_reason {
        out.push_str(&format!(
            "  (the bound policy was not used: {})\n",
            printable(why)
        ));
    }
    if a.endpoints.is_empty() {
        return out;
    }
    let rows: Vec<Vec<String>> = a
        .endpoints
        .iter()
        .map(|e| {
            vec![
                e.address.clone(),
                e.port.to_string(),
                printable(&e.node).into_owned(),
                printable(&e.zone).into_owned(),
                e.weight.to_string(),
                e.slot.to_string(),
                e.ports
                    .iter()
                    .map(|(n, p)| format!("{}={p}", printable(n)))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    out.push_str(&table(
        &["ADDRESS", "PORT", "NODE", "ZONE", "WEIGHT", "SLOT", "PORTS"],
        &rows,
    ));
    out
}

/// Writes `text` to `path` atomically: a temp file in the same directory, synced,
/// then renamed over it.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("--out {} names no file", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.shoal-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Runs `cmd` with `sh -c`; Err with its exit status and output when it fails.
async fn run_exec(cmd: &str, limit: Duration) -> anyhow::Result<()> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, child)
        .await
        .map_err(|_| anyhow::anyhow!("`{cmd}` did not finish within {limit:?}; killed"))?
        .with_context(|| format!("running `{cmd}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`{cmd}` failed ({}){}",
            out.status,
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", printable(stderr.trim()))
            }
        );
    }
    Ok(())
}

/// The catalog once it moved past `index`; in watch mode the agent being away is
/// waited out (reported once), otherwise it is an error.
async fn next_catalog(
    client: &Client,
    index: u64,
    wait: Duration,
    watch: bool,
) -> anyhow::Result<CatalogView> {
    let mut backoff = Duration::from_millis(500);
    let mut reported = false;
    loop {
        match client.discover_all(index, wait).await {
            Ok(c) => {
                if reported {
                    eprintln!("shoal render: the agent answers again");
                }
                return Ok(c);
            }
            Err(e) if watch => {
                if !reported {
                    eprintln!("shoal render: {e:#}; retrying");
                    reported = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `shoal render`.
pub async fn render(api: &str, args: RenderArgs) -> anyhow::Result<()> {
    let source = std::fs::read_to_string(&args.template)
        .with_context(|| format!("reading template {}", args.template.display()))?;
    let name = args.template.display().to_string();
    let template = Template::parse(&name, &source)?;
    let client = Client::new(api)?;
    let (min, max) = args.wait;
    let mut index = 0;
    loop {
        let mut catalog = next_catalog(&client, index, Duration::from_secs(60), args.watch).await?;
        if index > 0 && catalog.generation <= index {
            continue; // The long poll ran out without a change.
        }
        if args.watch && index > 0 {
            // Coalesce a burst: wait for `min` of quiet, `max` at most.
            let first = Instant::now();
            while first.elapsed() < max {
                let left = (max - first.elapsed()).min(min);
                let newer = next_catalog(&client, catalog.generation, left, true).await?;
                if newer.generation <= catalog.generation {
                    break;
                }
                catalog = newer;
            }
        }
        index = catalog.generation;
        let text = match template.render(&catalog) {
            Ok(t) => t,
            Err(e) if args.watch => {
                eprintln!("shoal render: {e}; keeping {} as it is", args.out.display());
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let current = std::fs::read_to_string(&args.out).ok();
        if current.as_deref() != Some(text.as_str()) {
            write_atomically(&args.out, &text)?;
            eprintln!(
                "shoal render: wrote {} (catalog generation {})",
                args.out.display(),
                catalog.generation
            );
            if let Some(cmd) = &args.exec {
                match run_exec(cmd, args.exec_timeout).await {
                    Ok(()) => {}
                    Err(e) if args.watch => eprintln!("shoal render: {e:#}"),
                    Err(e) => return Err(e),
                }
            }
        }
        if !args.watch {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_takes_min_and_max() {
        assert_eq!(
            parse_wait("200ms:1s").unwrap(),
            (Duration::from_millis(200), Duration::from_secs(1))
        );
        assert_eq!(
            parse_wait("1s").unwrap(),
            (Duration::from_secs(1), Duration::from_secs(4))
        );
        assert!(parse_wait("2s:1s").unwrap_err().contains("MAX"));
        assert!(parse_wait("soon").is_err());
        assert!(parse_wait("1s:10m").is_err());
    }

    #[test]
    fn writes_replace_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("up.conf");
        write_atomically(&out, "one\n").unwrap();
        write_atomically(&out, "two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "two\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left behind");
        assert!(write_atomically(&dir.path().join("missing/x"), "x").is_err());
    }

    #[tokio::test]
    async fn exec_failures_name_the_command_and_its_output() {
        run_exec("true", Duration::from_secs(5)).await.unwrap();
        let e = run_exec("echo broken >&2; exit 3", Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("exit status: 3") && e.contains("broken"), "{e}");
        let e = run_exec("sleep 5", Duration::from_millis(100))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not finish"), "{e}");
    }
}
