//! `shoal kv …`: the user key/value store, through one agent's API.
//!
//! Only user keys are read and written; shoal's internal records are refused by
//! the agent with the command to use, and `kv ls --internal` lists them read-only.
//! Keys and values are printed with control characters escaped.

use clap::Subcommand;

use crate::client::{kv_table, printable_text, Client, Format};

/// The kv subcommands.
#[derive(Subcommand)]
pub enum KvCmd {
    /// Write a key (acknowledged once on disk).
    Put {
        /// The key, e.g. app/color.
        key: String,
        /// The value (text).
        value: String,
    },
    /// Read a key from the agent's replica; exits 1 if missing.
    Get {
        /// The key.
        key: String,
    },
    /// List keys under a prefix.
    Ls {
        /// Key prefix (all keys when omitted).
        prefix: Option<String>,
        /// List shoal's internal records (read-only) instead of user keys.
        #[arg(long)]
        internal: bool,
    },
    /// Delete a key; exits 1 if missing.
    Rm {
        /// The key.
        key: String,
    },
}

/// Runs one kv subcommand against `api`.
pub async fn run(cmd: KvCmd, api: &str, output: Format) -> anyhow::Result<()> {
    let c = Client::new(api)?;
    let json = output == Format::Json;
    match cmd {
        KvCmd::Put { key, value } => {
            let e = c.kv_put(&key, &value).await?;
            if json {
                crate::print_json(&e)?;
            }
        }
        KvCmd::Get { key } => {
            let e = c.kv_get(&key).await?;
            if json {
                crate::print_json(&e)?;
            } else {
                println!("{}", printable_text(&e.value));
            }
        }
        KvCmd::Ls { prefix, internal } => {
            let v = c.kv_list(prefix.as_deref().unwrap_or(""), internal).await?;
            if json {
                crate::print_json(&v)?;
            } else {
                print!("{}", kv_table(&v));
            }
        }
        KvCmd::Rm { key } => {
            let v = c.kv_rm(&key).await?;
            if json {
                crate::print_json(&v)?;
            }
        }
    }
    Ok(())
}
