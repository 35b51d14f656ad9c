//! The chaos suite, short form: fixed seeds of faults over 5 real agents in network
//! namespaces (partitions of every shape, loss, delay, kill -9, SIGSTOP, full
//! disks) with client load, then every invariant after the heal.
//! `SHOAL_CHAOS_SEEDS=4,9` runs other seeds; long runs are `shoal-chaos --runs
//! 100` (README, BENCHMARKS.md).

use std::process::Command;
use std::time::Duration;

use shoal_chaos::{run, violations, ChaosConfig, Lab, LabConfig, Ledger, CI_SEEDS, CI_STEPS};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

#[test]
fn fixed_seeds_keep_every_invariant() {
    let seeds: Vec<u64> = match std::env::var("SHOAL_CHAOS_SEEDS") {
        Ok(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .expect("SHOAL_CHAOS_SEEDS: comma-separated numbers")
            })
            .collect(),
        Err(_) => CI_SEEDS.to_vec(),
    };
    for seed in seeds {
        let cfg = ChaosConfig {
            shoal: SHOAL.into(),
            agents: 5,
            seed,
            steps: CI_STEPS,
            hold: Duration::from_secs(4),
            settle: Duration::from_secs(120),
        };
        match run(&cfg) {
            Ok(r) => eprintln!(
                "seed {seed}: {} faults, {} ops ({} refused), {} writes acknowledged, {} lost, converged in {:?}\n  {}",
                r.faults,
                r.ops,
                r.ops_refused,
                r.writes_acked,
                r.writes_lost,
                r.converged,
                r.timeline.join("\n  ")
            ),
            Err(f) => panic!("{f}"),
        }
    }
}

/// The checker itself fails when it should: a write that never reached the
/// cluster, and a process no slot names, are both reported.
#[test]
fn the_checker_reports_lost_writes_and_stray_processes() {
    let mut lab = Lab::new(LabConfig {
        agents: 2,
        shoal: SHOAL.into(),
        agent_args: Vec::new(),
        data_tmpfs: Some(64 << 20),
    })
    .expect("building the lab (needs root and iproute2)");
    lab.start_all().unwrap();
    let mut ledger = Ledger::default();
    lab.wait("a whole, quiet cluster", Duration::from_secs(60), |l| {
        violations(l, &ledger).is_empty().then_some(())
    })
    .unwrap();

    ledger
        .acked
        .insert("chaos/w/never".into(), "written".into());
    let stray = Command::new("ip")
        .args(["netns", "exec", &lab.agents[1].ns, "env"])
        .arg(format!("SHOAL_LAB={}", lab.tag()))
        .args(["SHOAL_SERVICE=ghost", "SHOAL_SLOT=0", "sleep", "120"])
        .spawn()
        .unwrap();
    let found = lab
        .wait("both violations", Duration::from_secs(10), |l| {
            let v = violations(l, &ledger);
            let lost = v
                .iter()
                .any(|m| m.contains("acknowledged write chaos/w/never"));
            let ghost = v
                .iter()
                .any(|m| m.contains("ghost slot 0 runs on n2 although no live slot names it"));
            (lost && ghost).then_some(v)
        })
        .unwrap();
    assert!(
        found.len() >= 3,
        "one line per agent for the write: {found:?}"
    );

    // A full disk refuses writes by name instead of acknowledging them.
    lab.fill_disk(0).unwrap();
    let out = lab.cli(0, &["kv", "put", "chaos/w/full", "x"]).unwrap();
    lab.free_disk(0).unwrap();
    assert!(
        !out.status.success(),
        "a write on a full disk was acknowledged"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not persisted"), "{err}");
    // Once there is room again, writes are durable again without a restart.
    let out = lab.cli(0, &["kv", "put", "chaos/w/room", "x"]).unwrap();
    assert!(
        out.status.success(),
        "a write after the disk was freed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(lab);
    let mut stray = stray;
    let _ = stray.wait();
}

/// Sums one counter of agent `i`'s metrics page (0 if it cannot be read).
fn metric(lab: &Lab, i: usize, name: &str) -> u64 {
    lab.metrics(i)
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Failure detection that does not cry wolf (Lifeguard): 10% of packets lost on
/// every agent, and one agent starved of CPU (pinned to a core with two busy
/// loops) and stopped for a second now and then. No live agent is ever declared
/// down; the starved one is suspected and refutes. A real `kill -9` afterwards
/// is still seen down by every other agent.
#[test]
fn no_live_agent_is_declared_down_under_loss_and_starvation() {
    let mut lab = Lab::new(LabConfig {
        agents: 5,
        shoal: SHOAL.into(),
        agent_args: Vec::new(),
        data_tmpfs: None,
    })
    .expect("building the lab (needs root and iproute2)");
    lab.start_all().unwrap();
    let ledger = Ledger::default();
    lab.wait("a whole cluster", Duration::from_secs(60), |l| {
        violations(l, &ledger).is_empty().then_some(())
    })
    .unwrap();
    for i in 0..5 {
        lab.set_loss(i, 10).unwrap();
    }
    let starved = 3;
    let hogs = lab.starve(starved, 2).unwrap();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(8));
        lab.signal(starved, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(1000));
        lab.signal(starved, libc::SIGCONT);
    }
    std::thread::sleep(Duration::from_secs(8));
    drop(hogs);
    for i in 0..5 {
        lab.set_loss(i, 0).unwrap();
    }
    let declared: Vec<u64> = (0..5)
        .map(|i| metric(&lab, i, "shoal_swim_declared_down_total"))
        .collect();
    let downs: Vec<String> = (0..5)
        .flat_map(|i| {
            lab.log(i)
                .lines()
                .filter(|l| l.contains("member down"))
                .map(|l| format!("n{}: {l}", i + 1))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        declared.iter().all(|&d| d == 0) && downs.is_empty(),
        "live agents declared down (per agent {declared:?}):\n{}",
        downs.join("\n")
    );
    assert!(
        metric(&lab, starved, "shoal_swim_refutations_total") > 0,
        "the starved agent was never suspected, so this proves nothing"
    );

    lab.signal(0, libc::SIGKILL);
    lab.wait(
        "n1 seen down by every other agent",
        Duration::from_secs(30),
        |l| {
            (1..5)
                .all(|i| {
                    l.view(i)
                        .is_some_and(|v| v.iter().any(|(m, st)| m == "n1" && st == "down"))
                })
                .then_some(())
        },
    )
    .unwrap();
}

/// A UDP socket in agent 0's namespace that gives up a read after 5 s.
fn client_socket(lab: &Lab) -> std::net::UdpSocket {
    let client = lab
        .in_namespace(0, || std::net::UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client
}

/// Round trips of `n` datagrams from agent 0's namespace to an echo on agent 1's
/// address, sent one at a time.
fn round_trips(lab: &Lab, echo: std::net::SocketAddr, n: u32) -> Vec<Duration> {
    let client = client_socket(lab);
    let mut buf = [0u8; 16];
    (0..n)
        .map(|k| {
            let sent = std::time::Instant::now();
            client.send_to(&k.to_be_bytes(), echo).unwrap();
            let (len, _) = client.recv_from(&mut buf).expect("an echo within 5 s");
            assert_eq!(&buf[..len], &k.to_be_bytes());
            sent.elapsed()
        })
        .collect()
}

/// The delay fault (NFQUEUE to a harness thread, since this kernel has no
/// `netem`): every packet an agent receives is held for the delay, with jitter
/// they come out of order, and clearing it releases them at once.
#[test]
fn a_delay_fault_holds_an_agents_incoming_packets_until_cleared() {
    let mut lab = Lab::new(LabConfig {
        agents: 2,
        shoal: SHOAL.into(),
        agent_args: Vec::new(),
        data_tmpfs: None,
    })
    .expect("building the lab (needs root and iproute2)");
    let echo = std::net::SocketAddr::from((lab.agents[1].addr.ip(), 9999));
    let server = lab
        .in_namespace(1, || std::net::UdpSocket::bind(echo))
        .unwrap()
        .unwrap();
    let echoing = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        server
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        while let Ok((len, from)) = server.recv_from(&mut buf) {
            if &buf[..len] == b"stop" {
                break;
            }
            let _ = server.send_to(&buf[..len], from);
        }
    });

    let before = round_trips(&lab, echo, 5);
    assert!(
        before.iter().all(|d| *d < Duration::from_millis(250)),
        "{before:?}"
    );

    lab.set_delay(1, Duration::from_millis(300), Duration::ZERO, 1)
        .unwrap();
    let delayed = round_trips(&lab, echo, 5);
    assert!(
        delayed.iter().all(|d| *d >= Duration::from_millis(300)),
        "a 300 ms delay on n2's incoming packets: {delayed:?}"
    );
    assert!(lab.delayed_packets(1) >= 5, "{}", lab.delayed_packets(1));

    // With jitter, a burst comes back in another order than it was sent.
    lab.set_delay(1, Duration::from_millis(200), Duration::from_millis(150), 2)
        .unwrap();
    let client = client_socket(&lab);
    for k in 0u32..20 {
        client.send_to(&k.to_be_bytes(), echo).unwrap();
    }
    let mut order = Vec::new();
    let mut buf = [0u8; 16];
    for _ in 0..20 {
        let (len, _) = client.recv_from(&mut buf).expect("every echo comes back");
        order.push(u32::from_be_bytes(buf[..len].try_into().unwrap()));
    }
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..20).collect::<Vec<u32>>(),
        "none lost: {order:?}"
    );
    assert_ne!(order, sorted, "jitter reorders packets");

    lab.set_delay(1, Duration::ZERO, Duration::ZERO, 0).unwrap();
    let after = round_trips(&lab, echo, 5);
    assert!(
        after.iter().all(|d| *d < Duration::from_millis(250)),
        "{after:?}"
    );
    assert_eq!(lab.delayed_packets(1), 0);
    client.send_to(b"stop", echo).unwrap();
    echoing.join().unwrap();
}
