//! Real agents in network namespaces: partitions heal by themselves once the
//! links are back, whatever their shape; no agent has to be restarted.

use std::time::{Duration, Instant};

use shoal_chaos::{Lab, LabConfig};

fn lab(n: usize) -> Lab {
    let mut lab = Lab::new(LabConfig {
        agents: n,
        shoal: env!("CARGO_BIN_EXE_shoal").into(),
        agent_args: Vec::new(),
        data_tmpfs: None,
    })
    .expect("building the lab (needs root and iproute2)");
    lab.start_all().expect("starting agents");
    lab
}

/// Whether agent `i` sees exactly the agents `alive` alive.
fn sees_alive(lab: &Lab, i: usize, alive: &[usize]) -> bool {
    let Some(view) = lab.view(i) else {
        return false;
    };
    let want: Vec<String> = alive.iter().map(|j| format!("n{}", j + 1)).collect();
    let got: Vec<&String> = view
        .iter()
        .filter(|(_, st)| st == "alive")
        .map(|(n, _)| n)
        .collect();
    got.len() == want.len() && want.iter().all(|w| got.contains(&w))
}

fn kv(lab: &Lab, i: usize, key: &str) -> Option<String> {
    lab.cli_json(i, &["kv", "get", key])
        .and_then(|v| v["value"].as_str().map(str::to_string))
}

/// Cuts a 3-agent mesh into `groups`, writes on every side, heals, and checks that
/// membership and data come back together without restarting anything.
fn split_and_heal(groups: &[Vec<usize>]) {
    let n = 3;
    let mut lab = lab(n);
    let all: Vec<usize> = (0..n).collect();
    lab.wait("all agents see each other", Duration::from_secs(60), |l| {
        all.iter().all(|&i| sees_alive(l, i, &all)).then_some(())
    })
    .unwrap();

    lab.partition(groups).unwrap();
    lab.wait(
        "every side sees only itself",
        Duration::from_secs(60),
        |l| {
            groups
                .iter()
                .all(|g| g.iter().all(|&i| sees_alive(l, i, g)))
                .then_some(())
        },
    )
    .unwrap();
    for (g, members) in groups.iter().enumerate() {
        let out = lab
            .cli(
                members[0],
                &["kv", "put", "app/side", &format!("group {g}")],
            )
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Stay cut off long enough for every rejoin backoff to reach its cap.
    std::thread::sleep(Duration::from_secs(15));

    lab.heal().unwrap();
    let healed = Instant::now();
    lab.wait(
        "membership whole and one value everywhere after the heal",
        Duration::from_secs(90),
        |l| {
            if !all.iter().all(|&i| sees_alive(l, i, &all)) {
                return None;
            }
            let values: Vec<Option<String>> = all.iter().map(|&i| kv(l, i, "app/side")).collect();
            (values[0].is_some() && values.iter().all(|v| *v == values[0])).then_some(())
        },
    )
    .unwrap_or_else(|e| {
        let logs: Vec<String> = (0..n).map(|i| lab.log(i)).collect();
        panic!("{e}\nlogs:\n{}", logs.join("\n---\n"))
    });
    eprintln!(
        "split {groups:?} healed {:?} after the links came back",
        healed.elapsed()
    );
    // Every side whose write lost the merge hears of it: a `write lost` event from
    // its writer, and none from the winner's.
    let winner = kv(&lab, 0, "app/side").unwrap();
    let writer = |g: usize| format!("n{}", groups[g][0] + 1);
    let losers: Vec<String> = (0..groups.len())
        .filter(|g| format!("group {g}") != winner)
        .map(writer)
        .collect();
    let won = (0..groups.len())
        .find(|g| format!("group {g}") == winner)
        .map(writer)
        .unwrap();
    let lost = lab
        .wait(
            "every undone write is an event",
            Duration::from_secs(30),
            |l| {
                let ev = l.cli_json(0, &["events", "--kind", "write lost", "--limit", "100"])?;
                let ev = ev.as_array()?.clone();
                let about = |n: &str| {
                    ev.iter().any(|e| {
                        e["node"] == n
                            && e["reason"].as_str().is_some_and(|r| {
                                r.starts_with("kv app/side: this node's write (\"group")
                            })
                    })
                };
                losers.iter().all(|n| about(n)).then_some(ev)
            },
        )
        .unwrap();
    assert!(lost.iter().all(|e| e["node"] != won.as_str()), "{lost:?}");
    for i in 0..n {
        assert!(
            !lab.log(i).contains("panicked"),
            "agent {i} panicked:\n{}",
            lab.log(i)
        );
    }
}

/// The case that never healed: every agent alone. Each keeps announcing itself to
/// every member it knew, so the mesh comes back by itself.
#[test]
fn a_partition_into_singletons_heals_by_itself() {
    split_and_heal(&[vec![0], vec![1], vec![2]]);
}

#[test]
fn a_two_against_one_partition_heals() {
    split_and_heal(&[vec![0, 1], vec![2]]);
}
