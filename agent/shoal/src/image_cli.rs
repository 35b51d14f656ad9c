//! `shoal image ...`: push images from an agent's Docker Engine into the mesh, list
//! them with the nodes that hold them, pull one onto an agent, remove one.

use std::io::IsTerminal;

use anyhow::{anyhow, bail, Context};

use crate::agent::images::{short_id, PushEvent};
use crate::client::{clock_text, table, Client, Format};
use shoal_api::{human_bytes, ImageView};

/// `shoal image` subcommands.
#[derive(clap::Subcommand)]
pub enum ImageCmd {
    /// Push an image from the Docker Engine of the agent behind --api into the mesh.
    Push {
        /// `name[:tag]` (`:latest` when no tag is given).
        reference: String,
        /// Preheat: nodes that fetch it at once, `all` or LABEL=VALUE.
        #[arg(long, value_name = "all|LABEL=VALUE")]
        to: Option<String>,
        /// Move the tag if it already names another image in the mesh.
        #[arg(long)]
        replace: bool,
    },
    /// Pushed images: size, layers, which nodes hold them, pulls in progress.
    Ls,
    /// Fetch a pushed image into the Docker Engine of the agent behind --api.
    Pull {
        /// `name[:tag]`.
        reference: String,
    },
    /// Remove an image from the mesh (its blobs are collected after the grace).
    Rm {
        /// `name[:tag]`.
        reference: String,
    },
}

/// Runs a `shoal image` subcommand.
pub async fn run(cmd: ImageCmd, api: &str, output: Format) -> anyhow::Result<()> {
    let c = Client::new(api)?;
    match cmd {
        ImageCmd::Push {
            reference,
            to,
            replace,
        } => push(&c, &reference, to.as_deref(), replace, output).await,
        ImageCmd::Ls => {
            let list = c.images().await?;
            match output {
                Format::Json => crate::print_json(&list),
                Format::Table => {
                    print!("{}", images_table(&list));
                    Ok(())
                }
            }
        }
        ImageCmd::Pull { reference } => {
            let v = c.image_pull(&reference).await?;
            match output {
                Format::Json => crate::print_json(&v),
                Format::Table => {
                    println!(
                        "{} is in the agent's Docker Engine",
                        v["pulled"].as_str().unwrap_or(&reference)
                    );
                    Ok(())
                }
            }
        }
        ImageCmd::Rm { reference } => {
            let v = c.image_rm(&reference).await?;
            match output {
                Format::Json => crate::print_json(&v),
                Format::Table => {
                    println!("removed {}", v.removed);
                    for w in &v.warnings {
                        eprintln!("warning: {w}");
                    }
                    Ok(())
                }
            }
        }
    }
}

async fn push(
    c: &Client,
    reference: &str,
    to: Option<&str>,
    replace: bool,
    output: Format,
) -> anyhow::Result<()> {
    let mut resp = c.image_push(reference, to, replace).await?;
    let bar = (output == Format::Table && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message("save");
        b
    });
    let mut buf: Vec<u8> = Vec::new();
    let mut last: Option<PushEvent> = None;
    while let Some(chunk) = resp.chunk().await.context("reading the push's progress")? {
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let ev: PushEvent = serde_json::from_slice(&line).with_context(|| {
                format!(
                    "unexpected progress line {:?}",
                    String::from_utf8_lossy(&line)
                )
            })?;
            if let (Some(b), PushEvent::Progress { phase, done, total }) = (&bar, &ev) {
                b.set_message(phase.clone());
                b.set_length(*total);
                b.set_position(*done);
            }
            if matches!(ev, PushEvent::Done(_) | PushEvent::Error(_)) {
                last = Some(ev);
            }
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match last {
        Some(PushEvent::Done(rec)) => match output {
            Format::Json => crate::print_json(&rec),
            Format::Table => {
                println!(
                    "pushed {} ({}, {} layer{}, {}) from {}",
                    rec.reference,
                    short_id(&rec.id),
                    rec.layers.len(),
                    if rec.layers.len() == 1 { "" } else { "s" },
                    human_bytes(rec.size()),
                    rec.pushed_by
                );
                if let Some(p) = &rec.preheat {
                    println!("preheating on {p}: `shoal image ls` shows who holds it");
                }
                Ok(())
            }
        },
        Some(PushEvent::Error(e)) => Err(anyhow!(e)),
        _ => bail!("the agent ended the push without a result (did it stop?)"),
    }
}

/// The `shoal image ls` table.
pub fn images_table(list: &[ImageView]) -> String {
    if list.is_empty() {
        return "no images pushed (shoal image push NAME:TAG)\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let pulling = i
                .pulling
                .iter()
                .map(|p| {
                    format!(
                        "{} {}/{}",
                        p.node,
                        human_bytes(p.done),
                        human_bytes(p.total)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            vec![
                i.reference.clone(),
                short_id(&i.id),
                human_bytes(i.size),
                i.layers.to_string(),
                join_or_dash(&i.holders),
                join_or_dash(&i.engines),
                if pulling.is_empty() {
                    "-".into()
                } else {
                    pulling
                },
                format!("{} {}", i.pushed_by, clock_text(i.pushed_ms)),
            ]
        })
        .collect();
    table(
        &[
            "IMAGE",
            "ID",
            "SIZE",
            "LAYERS",
            "HELD BY",
            "LOADED ON",
            "PULLING",
            "PUSHED",
        ],
        &rows,
    )
}

fn join_or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}
