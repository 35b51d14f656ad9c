//! Discovery through real clients: `dig` against the DNS of 5 real agents, a real
//! nginx fed by `shoal render --watch` in front of a service during a rolling update
//! and a scale-down, and discovery plugins bound per service.
//!
//! `dig` (bind9-dnsutils) and `nginx` (nginx-light) must be installed;
//! `./scripts/test` installs them when missing.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Fails the test with the package to install when `tool` is missing.
fn require(tool: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = PathBuf::from(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{tool}` is not installed: apt-get install {package} (./scripts/test installs it)");
}

/// One `dig` answer.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: Vec<String>,
    answers: Vec<String>,
    raw: String,
}

fn dig(server: SocketAddr, name: &str, qtype: &str, extra: &[&str]) -> Dig {
    let bin = require("dig", "bind9-dnsutils");
    let out = Command::new(bin)
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), name, qtype])
        .args(["+noall", "+comments", "+answer", "+time=2", "+tries=2"])
        .args(extra)
        .output()
        .unwrap();
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    // With TC and no +ignore, dig prints the UDP header, then the TCP answer: the
    // last header is the one that counts.
    let status = raw
        .lines()
        .filter_map(|l| l.split("status: ").nth(1))
        .filter_map(|s| s.split(',').next())
        .next_back()
        .unwrap_or("")
        .to_string();
    let flags = raw
        .lines()
        .filter_map(|l| l.strip_prefix(";; flags: "))
        .next_back()
        .map(|l| {
            l.split(';')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let answers = raw
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().skip(4).collect::<Vec<_>>().join(" "))
        .collect();
    Dig {
        status,
        flags,
        answers,
        raw,
    }
}

/// SRV answers of `name` on `server` as (port, target) pairs.
fn srv(server: SocketAddr, name: &str) -> BTreeSet<(u16, String)> {
    dig(server, name, "SRV", &[])
        .answers
        .iter()
        .filter_map(|a| {
            let f: Vec<&str> = a.split_whitespace().collect();
            Some((f.get(2)?.parse().ok()?, f.get(3)?.to_string()))
        })
        .collect()
}

/// (port, node) of every healthy replica of `svc`, from `shoal ps`.
fn healthy_ports(c: &Cluster, svc: &str) -> BTreeSet<(u16, String)> {
    c.ps(0, svc)
        .iter()
        .filter(|r| r["healthy"] == true && r["state"] == "running")
        .filter_map(|r| {
            let port = r["endpoint"].as_str()?.rsplit(':').next()?.parse().ok()?;
            Some((port, format!("{}.node.shoal.", r["node"].as_str()?)))
        })
        .collect()
}

fn web_spec(version: &str, bind: &str, extra: &str) -> String {
    format!(
        r#"name = "web"
driver = "process"
command = ["shoal", "workload", "http", "--bind", "{bind}"]
replicas = 3
env = {{ VERSION = "{version}" }}
{extra}
[[ports]]
name = "http"
container_port = 8080
[health]
http = "/healthz"
interval = "300ms"
timeout = "1s"
grace = "5s"
"#
    )
}

/// 5 agents, each advertising its own loopback address (127.0.0.1 to .5), so node
/// names and endpoint addresses differ per node.
fn five_on_own_addresses() -> Cluster {
    let mut c = Cluster::new(0);
    for i in 0..5 {
        let idx = c.add_agent(Vec::new());
        let ip = IpAddr::from([127, 0, 0, 1 + i as u8]);
        let port = UdpSocket::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        c.agents[idx].quic = SocketAddr::new(ip, port);
    }
    for i in 0..5 {
        c.spawn(i);
    }
    c.wait_all_alive(Duration::from_secs(30));
    c
}

#[test]
fn dig_gets_services_and_nodes_from_every_agent() {
    let c = five_on_own_addresses();
    let dns: Vec<SocketAddr> = c.agents.iter().map(|a| a.dns).collect();
    let out = c.deploy_wait(0, "web.toml", &web_spec("1", "0.0.0.0", ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Enough replicas that their SRV answer cannot fit a UDP datagram.
    let big =
        "name = \"big\"\ndriver = \"process\"\ncommand = [\"sleep\", \"3600\"]\nreplicas = 60\n\
               stop_delay = \"0s\"\n[[ports]]\nname = \"p\"\ncontainer_port = 1\n";
    let out = c.deploy_wait(1, "big.toml", big);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every agent: SRV of the named port and of the service, A of the service.
    let want = healthy_ports(&c, "web");
    assert_eq!(want.len(), 3, "{want:?}");
    for (i, d) in dns.iter().enumerate() {
        let got = wait_for(
            &format!("agent {i} to serve web's SRV"),
            Duration::from_secs(20),
            || {
                let s = srv(*d, "_http._tcp.web.service.shoal");
                (s == want).then_some(s)
            },
        );
        assert_eq!(
            srv(*d, "web.service.shoal"),
            got,
            "plain SRV: the first port"
        );
        let a = dig(*d, "web.service.shoal", "A", &[]);
        assert_eq!(a.status, "NOERROR");
        assert!(
            a.flags.contains(&"aa".to_string()),
            "authoritative: {}",
            a.raw
        );
        let ips: BTreeSet<String> = a.answers.iter().map(|x| x.to_string()).collect();
        let nodes: BTreeSet<String> = want
            .iter()
            .map(|(_, t)| format!("127.0.0.{}", &t[1..t.find('.').unwrap()]))
            .collect();
        assert_eq!(ips, nodes, "A: the replicas' nodes' addresses\n{}", a.raw);
    }
    let n3 = dig(dns[0], "n3.node.shoal", "A", &[]);
    assert_eq!(n3.answers, vec!["127.0.0.3"], "{}", n3.raw);
    let srv_full = dig(
        dns[1],
        "_http._tcp.web.service.shoal",
        "SRV",
        &["+additional"],
    );
    assert!(
        srv_full.raw.contains("node.shoal."),
        "glue: {}",
        srv_full.raw
    );

    // Negative answers.
    assert_eq!(
        dig(dns[2], "nope.service.shoal", "A", &[]).status,
        "NXDOMAIN"
    );
    assert_eq!(dig(dns[2], "ghost.node.shoal", "A", &[]).status, "NXDOMAIN");
    assert_eq!(
        dig(dns[2], "_grpc._tcp.web.service.shoal", "SRV", &[]).status,
        "NXDOMAIN"
    );
    let refused = dig(dns[3], "example.com", "A", &[]);
    assert_eq!(refused.status, "REFUSED", "{}", refused.raw);
    let empty = dig(dns[3], "web.service.shoal", "TXT", &[]);
    assert_eq!((empty.status.as_str(), empty.answers.len()), ("NOERROR", 0));

    // Too big for UDP: TC over UDP, every record over TCP (dig retries by itself).
    wait_for("all 60 of big", Duration::from_secs(30), || {
        (dig(dns[4], "big.service.shoal", "SRV", &["+tcp"])
            .answers
            .len()
            == 60)
            .then_some(())
    });
    let udp = dig(dns[4], "big.service.shoal", "SRV", &["+noedns", "+ignore"]);
    assert!(udp.flags.contains(&"tc".to_string()), "{}", udp.raw);
    assert!(udp.answers.len() < 60);
    let retried = dig(dns[4], "big.service.shoal", "SRV", &["+noedns"]);
    assert_eq!(retried.answers.len(), 60, "{}", retried.raw);
    let edns = dig(dns[4], "big.service.shoal", "SRV", &["+bufsize=1232"]);
    assert_eq!(edns.answers.len(), 60, "after TC, over TCP");

    // A replica dies: every agent's answer drops its port, then has its restart.
    let victim = c.ps(0, "web").into_iter().find(|r| r["slot"] == 0).unwrap();
    let pid: i32 = victim["handle"].as_str().unwrap().parse().unwrap();
    let old_port: u16 = victim["endpoint"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: signalling a process group the test's agents started.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    for (i, d) in dns.iter().enumerate() {
        wait_for(
            &format!("agent {i} to drop the dead replica"),
            Duration::from_secs(20),
            || {
                let s = srv(*d, "_http._tcp.web.service.shoal");
                (!s.iter().any(|(p, _)| *p == old_port)).then_some(())
            },
        );
    }
    let restarted = wait_for("the replica restarted", Duration::from_secs(30), || {
        let h = healthy_ports(&c, "web");
        (h.len() == 3).then_some(h)
    });
    for (i, d) in dns.iter().enumerate() {
        wait_for(
            &format!("agent {i} to serve the restarted replica"),
            Duration::from_secs(20),
            || (srv(*d, "_http._tcp.web.service.shoal") == restarted).then_some(()),
        );
    }

    // A rolling update: every agent ends up with only the new replicas.
    let out = c.deploy_wait(2, "web.toml", &web_spec("2", "0.0.0.0", ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let updated = wait_for("3 new replicas healthy", Duration::from_secs(30), || {
        let h = healthy_ports(&c, "web");
        let all_new = c
            .ps(0, "web")
            .iter()
            .all(|r| r["version"] == 2 || r["state"] != "running");
        (h.len() == 3 && all_new && h.is_disjoint(&restarted)).then_some(h)
    });
    for (i, d) in dns.iter().enumerate() {
        wait_for(
            &format!("agent {i} to serve the new version"),
            Duration::from_secs(20),
            || (srv(*d, "_http._tcp.web.service.shoal") == updated).then_some(()),
        );
    }

    // The same answer over HTTP and the CLI, and counters on /metrics.
    let out = shoal(&["discover", "web", "-o", "json", "--api", &c.agents[0].url()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ports: BTreeSet<(u16, String)> = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["port"].as_u64().unwrap() as u16,
                format!("{}.node.shoal.", e["node"].as_str().unwrap()),
            )
        })
        .collect();
    assert_eq!(ports, updated);
    assert_eq!(v["caller"]["node"], "n1");
    assert!(
        v["decided_by"].as_str().unwrap().contains("zone-aware"),
        "{v}"
    );
    let table = shoal_ok(&["discover", "web", "--api", &c.agents[0].url()]);
    assert!(
        table.contains("3 endpoints for n1") && table.contains("WEIGHT"),
        "{table}"
    );
    let out = shoal(&["discover", "nope", "--api", &c.agents[0].url()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service named nope"));
    assert!(
        c.metric(2, "shoal_dns_answers_total{rcode=\"nxdomain\"}")
            .unwrap()
            >= 3.0
    );
    assert!(c.metric(4, "shoal_dns_truncated_total").unwrap() >= 1.0);
    assert!(c.metric(0, "shoal_discovery_endpoints").unwrap() >= 63.0);
}

/// Across machines (agents in network namespaces, each its own address): a replica
/// bound to every address is handed to every node at its node's address, and that
/// address works from the other machine; one bound to loopback is handed only to
/// callers on its own node.
#[test]
fn endpoints_are_addresses_other_machines_can_reach() {
    let mut lab = shoal_chaos::Lab::new(shoal_chaos::LabConfig {
        agents: 2,
        shoal: SHOAL.into(),
        agent_args: Vec::new(),
        data_tmpfs: None,
    })
    .expect("building the lab (needs root and iproute2)");
    lab.start_all().unwrap();
    lab.wait("both agents see each other", Duration::from_secs(60), |l| {
        (0..2)
            .all(|i| {
                l.view(i)
                    .is_some_and(|v| v.iter().filter(|(_, s)| s == "alive").count() == 2)
            })
            .then_some(())
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, bind) in [("anywhere", "0.0.0.0"), ("local", "127.0.0.1")] {
        let spec = web_spec("1", bind, "")
            .replace("name = \"web\"", &format!("name = \"{name}\""))
            .replace("replicas = 3", "replicas = 1");
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, spec).unwrap();
        let out = lab
            .cli(
                0,
                &[
                    "deploy",
                    path.to_str().unwrap(),
                    "--wait",
                    "--timeout",
                    "60",
                ],
            )
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dig_a = |i: usize, name: &str| -> Vec<String> {
        let out = lab
            .exec(
                i,
                "dig",
                &["@127.0.0.1", "-p", "8600", name, "A", "+short", "+time=2"],
            )
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let node_of = |svc: &str| -> usize {
        let rows = lab.cli_json(0, &["ps", svc]).unwrap();
        rows[0]["node"].as_str().unwrap()[1..]
            .parse::<usize>()
            .unwrap()
            - 1
    };
    let ip_of = |i: usize| lab.agents[i].addr.ip().to_string();

    let at = node_of("anywhere");
    let port = lab.cli_json(0, &["ps", "anywhere"]).unwrap()[0]["endpoint"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    for i in 0..2 {
        lab.wait(
            &format!("agent {i} to hand out its node's address"),
            Duration::from_secs(20),
            |_| (dig_a(i, "anywhere.service.shoal") == vec![ip_of(at)]).then_some(()),
        )
        .unwrap();
    }
    // That address answers from the other machine.
    let other = 1 - at;
    let url = format!("http://{}:{port}/", ip_of(at));
    let out = lab
        .exec(other, "curl", &["-sf", "--max-time", "5", &url])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello"),
        "{out:?}"
    );

    let home = node_of("local");
    lab.wait(
        "its own node to hand out loopback",
        Duration::from_secs(20),
        |_| (dig_a(home, "local.service.shoal") == vec!["127.0.0.1".to_string()]).then_some(()),
    )
    .unwrap();
    lab.wait(
        "the other node to hand out nothing",
        Duration::from_secs(20),
        |_| {
            dig_a(1 - home, "local.service.shoal")
                .is_empty()
                .then_some(())
        },
    )
    .unwrap();
}

/// nginx in front of `web`, its upstreams rendered by `shoal render --watch`.
struct Proxy {
    nginx: Child,
    render: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.render.kill();
        let _ = self.render.wait();
        // SAFETY: plain signal to the nginx master we started.
        unsafe { libc::kill(self.nginx.id() as i32, libc::SIGQUIT) };
        let _ = self.nginx.wait();
    }
}

fn proxy(c: &Cluster) -> Proxy {
    let nginx = require("nginx", "nginx-light");
    let dir = c.path().join("nginx");
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let port = free_tcp().port();
    let d = dir.display();
    // `proxy_next_upstream off`: a request that reaches a dead replica fails, so the
    // test sees every failure instead of nginx hiding it by retrying elsewhere.
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n\
           fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
           include {d}/upstreams.conf;\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://web;\n\
               proxy_next_upstream off;\n      proxy_connect_timeout 1s;\n    }}\n  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let template =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/nginx/upstreams.conf.j2");
    let upstreams = dir.join("upstreams.conf");
    let api = c.agents[0].url();
    // First render, then nginx, then the watcher that reloads it.
    let out = shoal(&[
        "render",
        template.to_str().unwrap(),
        "--out",
        upstreams.to_str().unwrap(),
        "--api",
        &api,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&upstreams).unwrap();
    assert!(text.contains("upstream web {"), "{text}");
    let nginx_child = Command::new(&nginx)
        .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("nginx.stderr")).unwrap())
        .spawn()
        .unwrap();
    let reload = format!("{} -p {d} -c {d}/nginx.conf -s reload", nginx.display());
    let render = Command::new(SHOAL)
        .args([
            "render",
            template.to_str().unwrap(),
            "--out",
            upstreams.to_str().unwrap(),
        ])
        .args([
            "--exec",
            &reload,
            "--watch",
            "--wait",
            "100ms:500ms",
            "--api",
            &api,
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("render.log")).unwrap())
        .spawn()
        .unwrap();
    let p = Proxy {
        nginx: nginx_child,
        render,
        port,
        dir,
    };
    wait_for(
        "nginx answering through web",
        Duration::from_secs(15),
        || {
            http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/")
                .filter(|b| b.contains("hello"))
                .map(|_| ())
        },
    );
    p
}

/// One `GET /` on a fresh connection: the status line, or what went wrong.
fn get_once(addr: SocketAddr) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    Ok(buf.lines().next().unwrap_or("").to_string())
}

/// Requests through nginx, one connection each, until stopped: (ok, failed, errors).
fn client_loop(
    port: u16,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut errors = Vec::new();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        while !stop.load(Ordering::Relaxed) {
            match get_once(addr) {
                Ok(status) if status.starts_with("HTTP/1.1 200") => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                other => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if errors.len() < 10 {
                        errors.push(format!("{other:?}"));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        errors
    })
}

#[test]
fn nginx_fed_by_render_fails_no_request_during_a_rollout_and_a_scale_down() {
    let c = Cluster::start(3);
    let out = c.deploy_wait(0, "web.toml", &web_spec("1", "127.0.0.1", ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = proxy(&c);
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let client = client_loop(p.port, stop.clone(), ok.clone(), failed.clone());
    std::thread::sleep(Duration::from_secs(1));

    // Rolling update, in place (max_surge 0): each old replica leaves discovery,
    // nginx reloads without it, and only then does it stop.
    let out = c.deploy_wait(1, "web.toml", &web_spec("2", "127.0.0.1", ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("only version 2 runs", Duration::from_secs(60), || {
        let rows = c.ps(0, "web");
        (rows.len() == 3
            && rows
                .iter()
                .all(|r| r["version"] == 2 && r["healthy"] == true))
        .then_some(())
    });
    let after_update = ok.load(Ordering::Relaxed);

    // Scale down to one replica.
    let out = shoal(&["scale", "web", "1", "--api", &c.agents[2].url()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("one replica left", Duration::from_secs(30), || {
        (workload_pids(c.path()).len() == 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let errors = client.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let log = std::fs::read_to_string(p.dir.join("render.log")).unwrap_or_default();
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed: {errors:?}\nrender log:\n{log}",
        ok + failed
    );
    assert!(
        after_update > 50 && ok > after_update,
        "the client loop ran: {after_update}, {ok}"
    );
    assert!(
        log.contains("wrote"),
        "render rewrote the upstreams:\n{log}"
    );
}

/// A discovery plugin bound to one service reorders its answers (DNS and HTTP);
/// a hostile one falls back to the built-in, and `plugin eval` runs one against the
/// live cluster.
#[test]
fn discovery_plugins_decide_and_hostile_ones_fall_back() {
    let c = Cluster::start(3);
    let out = c.deploy_wait(0, "web.toml", &web_spec("1", "127.0.0.1", ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wasm_dir = PathBuf::from(SHOAL)
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("wasm32-wasip2/release");
    let local_first = wasm_dir.join("local_first.wasm");
    let trap = wasm_dir.join("shoal_fixture_discovery_trap.wasm");
    assert!(
        local_first.exists() && trap.exists(),
        "built by the workspace build"
    );

    // The agent whose own replica the built-in does not put first.
    let discover = |i: usize| -> Value {
        let out = shoal(&["discover", "web", "-o", "json", "--api", &c.agents[i].url()]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let (caller, mine) = (0..3)
        .find_map(|i| {
            let v = discover(i);
            let eps = v["endpoints"].as_array()?.clone();
            let me = c.agents[i].name.clone();
            let pos = eps.iter().position(|e| e["node"] == me.as_str())?;
            (pos > 0).then(|| (i, eps[pos]["port"].clone()))
        })
        .expect("some agent does not get its own replica first from zone-aware");

    // Dry run against the live cluster.
    let eval = shoal_ok(&[
        "plugin",
        "eval",
        "--kind",
        "discovery",
        local_first.to_str().unwrap(),
        "--service",
        "web",
        "--api",
        &c.agents[caller].url(),
    ]);
    assert!(eval.contains("decided by: plugin eval"), "{eval}");

    shoal_ok(&[
        "plugin",
        "install",
        "--kind",
        "discovery",
        "--service",
        "web",
        "--name",
        "local-first",
        local_first.to_str().unwrap(),
        "--api",
        &c.agents[1].url(),
    ]);
    let v = wait_for("local-first to decide", Duration::from_secs(30), || {
        let v = discover(caller);
        v["decided_by"]
            .as_str()?
            .contains("local-first")
            .then_some(v)
    });
    assert_eq!(v["endpoints"][0]["port"], mine, "own node first: {v}");
    assert_eq!(v["endpoints"][0]["weight"], 1000);
    let first_srv = dig(
        c.agents[caller].dns,
        "_http._tcp.web.service.shoal",
        "SRV",
        &[],
    );
    assert!(
        first_srv.answers[0].contains(&format!(" {} ", mine)),
        "DNS follows the plugin's order: {}",
        first_srv.raw
    );

    // A plugin that traps: the built-in answers, and the reason is shown.
    shoal_ok(&[
        "plugin",
        "install",
        "--kind",
        "discovery",
        "--service",
        "web",
        "--name",
        "trap",
        trap.to_str().unwrap(),
        "--api",
        &c.agents[1].url(),
    ]);
    let v = wait_for("the built-in to stand in", Duration::from_secs(30), || {
        let v = discover(caller);
        (v["decided_by"].as_str()?.contains("built-in") && v["fallback_reason"].is_string())
            .then_some(v)
    });
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 3, "{v}");
    assert!(
        v["fallback_reason"].as_str().unwrap().contains("trap")
            || v["fallback_reason"].as_str().unwrap().contains("panic"),
        "{v}"
    );
    let d = dig(
        c.agents[caller].dns,
        "_http._tcp.web.service.shoal",
        "SRV",
        &[],
    );
    assert_eq!(d.answers.len(), 3, "DNS still answers: {}", d.raw);
}
