//! `shoal node drain | undrain | status | forget`: taking a machine out of
//! placement and back, and forgetting one that is gone for good.
//!
//! A drain is a cluster-wide mark (`drain/<node>`): the node takes no new
//! placements, and every allocation on it gets a replacement elsewhere that takes
//! over once healthy, after which the old one leaves discovery and stops after its
//! `stop_delay`. A replica that fits nowhere else stays (its slot says why), so a
//! drain never lowers a service's healthy count. Undrain removes the mark; nothing
//! moves back by itself.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;

use crate::client::{clock_text, Client, Format};
use shoal_api::DrainView;

/// The node subcommands.
#[derive(Subcommand)]
pub enum NodeCmd {
    /// Stop placing on a node and move its replicas elsewhere.
    Drain {
        /// The node.
        name: String,
        /// Wait until nothing runs on it any more.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Let a drained node take placements again.
    Undrain {
        /// The node.
        name: String,
    },
    /// Remove a down or left node from the member list and drop its records.
    Forget {
        /// The node.
        name: String,
    },
    /// Show whether a node is drained and what is still on it.
    Status {
        /// The node.
        name: String,
    },
}

/// Runs a node command against the agent at `api`.
pub async fn run(cmd: NodeCmd, api: &str, format: Format) -> anyhow::Result<()> {
    let c = Client::new(api)?;
    let json = format == Format::Json;
    match cmd {
        NodeCmd::Drain {
            name,
            wait,
            timeout,
        } => {
            let v = c.drain(&name, true).await?;
            if json && !wait {
                return print_json(&v);
            }
            if !json {
                let already = if v.changed == Some(false) {
                    " (already drained)"
                } else {
                    ""
                };
                println!(
                    "node {name} drained{already}: no new placements; {} allocations to move",
                    v.left.len()
                );
            }
            if !wait {
                return Ok(());
            }
            let done = wait_empty(&c, &name, Duration::from_secs(timeout), !json).await?;
            if json {
                return print_json(&done);
            }
            println!("node {name} is empty: every replica moved");
            Ok(())
        }
        NodeCmd::Undrain { name } => {
            let v = c.drain(&name, false).await?;
            if json {
                return print_json(&v);
            }
            if v.changed == Some(false) {
                println!("node {name} was not drained");
            } else {
                println!("node {name} undrained: it takes new placements again");
            }
            Ok(())
        }
        NodeCmd::Forget { name } => {
            let v = c.forget(&name).await?;
            if json {
                return print_json(&v);
            }
            println!(
                "node {name} forgotten: gone from the member list and its records dropped on every agent (a new start of it joins again)"
            );
            Ok(())
        }
        NodeCmd::Status { name } => {
            let v = c.drain_status(&name).await?;
            if json {
                return print_json(&v);
            }
            match v.since_ms {
                Some(at) => println!("node {name}: drained since {}", clock_text(at)),
                None => println!("node {name}: not drained"),
            }
            for a in &v.left {
                println!("  {a}");
            }
            Ok(())
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Polls until nothing is placed on or still running on `node`.
async fn wait_empty(
    c: &Client,
    node: &str,
    timeout: Duration,
    progress: bool,
) -> anyhow::Result<DrainView> {
    let start = Instant::now();
    let mut last = None;
    loop {
        let v = c.drain_status(node).await?;
        if !v.draining {
            bail!("node {node} was undrained while waiting");
        }
        if v.left.is_empty() {
            return Ok(v);
        }
        if progress && last.as_ref() != Some(&v.left) {
            println!("  {} left: {}", v.left.len(), v.left.join(", "));
            last = Some(v.left.clone());
        }
        if start.elapsed() >= timeout {
            bail!(
                "timed out after {}s: still on {node}: {} (`shoal ps --node {node}` says why)",
                timeout.as_secs(),
                v.left.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
