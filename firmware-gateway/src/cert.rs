//! `tributary cert`: the private CA of a deployment and the certificates of the mirror link
//! (one per site, named by its site id, and one for the cloud receiver), written as PEM files.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use tributary_sync::certs::{self, Pem};

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create the deployment's CA: DIR/ca.pem and DIR/ca.key (keep ca.key offline).
    Ca {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "Tributary mirror CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a gateway's certificate for SITE: OUT/site.pem and OUT/site.key, plus OUT/ca.pem.
    Site {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        site: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Issue the cloud receiver's certificate for the names gateways dial: OUT/cloud.pem,
    /// OUT/cloud.key, plus OUT/ca.pem.
    Cloud {
        #[arg(long)]
        ca_dir: PathBuf,
        /// DNS names or IP addresses (repeat the flag for several).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

fn with_ca(ca_dir: &Path, out: &Path, name: &str, issued: Pem) -> anyhow::Result<()> {
    issued.write(out, name).with_context(|| format!("write {name} certificate"))?;
    let ca = std::fs::read(ca_dir.join("ca.pem")).context("read ca.pem")?;
    std::fs::write(out.join("ca.pem"), ca).context("copy ca.pem")?;
    println!("wrote {0}/{name}.pem, {0}/{name}.key and {0}/ca.pem", out.display());
    Ok(())
}

pub fn run(cmd: CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Ca { dir, name, days } => {
            if dir.join("ca.key").exists() {
                anyhow::bail!("{} already exists: refusing to replace a CA", dir.join("ca.key").display());
            }
            certs::new_ca(&name, days)?.write(&dir, "ca")?;
            println!("wrote {0}/ca.pem and {0}/ca.key", dir.display());
            Ok(())
        }
        CertCommand::Site { ca_dir, site, out, days } => {
            let ca = Pem::read(&ca_dir, "ca")?;
            with_ca(&ca_dir, &out, "site", certs::site_cert(&ca, &site, days)?)
        }
        CertCommand::Cloud { ca_dir, names, out, days } => {
            let ca = Pem::read(&ca_dir, "ca")?;
            with_ca(&ca_dir, &out, "cloud", certs::server_cert(&ca, &names, days)?)
        }
    }
}
