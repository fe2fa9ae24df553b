//! The `kefu` command line (contract §1).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::http::CreateTenantBody;
use crate::settings::{Overrides, Settings};
use crate::startup::{self, Application};
use crate::storage::Storage;
use crate::tenancy::TenantStatus;
use crate::{demo, telemetry};

#[derive(Parser)]
#[command(name = "kefu", version, about = "Multi-tenant customer-service server")]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args)]
pub struct Common {
    /// TOML settings file (read after defaults, before KEFU_* variables).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Embedded storage directory (KEFU_DATA_DIR).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the server.
    Serve {
        /// HTTP + WebSocket listener (KEFU_LISTEN).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Provision tenant `demo` on demo.localhost and print how to use it.
        #[arg(long)]
        demo: bool,
    },
    /// Manage tenants without a running server.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Apply platform and tenant migrations, then exit.
    Migrate,
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Open a tenant: database, schema, domains and first admin, all or nothing.
    Create {
        #[arg(long)]
        slug: String,
        #[arg(long)]
        name: String,
        /// A domain bound to the tenant; repeat for more.
        #[arg(long = "domain", required = true)]
        domains: Vec<String>,
        #[arg(long)]
        admin_email: String,
        #[arg(long)]
        admin_password: String,
        #[arg(long, default_value = "Admin")]
        admin_name: String,
    },
    /// List tenants.
    List,
    /// Suspend a tenant: its data stays, its routes answer 403.
    Suspend { slug: String },
    /// Resume a suspended tenant.
    Resume { slug: String },
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        let listen = match &self.command {
            Command::Serve { listen, .. } => *listen,
            _ => None,
        };
        let settings = Settings::load(Overrides {
            config: self.common.config,
            listen,
            data_dir: self.common.data_dir,
        })?;
        // Held to the end of the command: its drop sends the spans still buffered (OTLP).
        let _telemetry = telemetry::init_with_export(&settings)?;
        match self.command {
            Command::Serve { demo, .. } => {
                let app = Application::build(settings).await?;
                if demo {
                    demo::provision(&app.state(), app.port()).await?;
                }
                app.run_until_signalled().await?;
                tracing::info!("kefu stopped");
            }
            Command::Migrate => {
                let storage = Storage::open(&settings).await?;
                let tenants = startup::prepare_tenants(storage).await?;
                println!(
                    "migrated the platform database and {} tenant databases",
                    tenants.all_records().await?.len()
                );
            }
            Command::Tenant(cmd) => {
                let storage = Storage::open(&settings).await?;
                let tenants = crate::tenancy::Tenants::new(storage);
                match cmd {
                    TenantCommand::Create {
                        slug,
                        name,
                        domains,
                        admin_email,
                        admin_password,
                        admin_name,
                    } => {
                        let body: CreateTenantBody = serde_json::from_value(serde_json::json!({
                            "slug": slug, "name": name, "domains": domains,
                            "admin": {"email": admin_email, "password": admin_password, "name": admin_name},
                        }))?;
                        let created = tenants.create(body.parse()?).await?;
                        println!("{}", serde_json::to_string_pretty(&created)?);
                    }
                    TenantCommand::List => {
                        println!("{:<24} {:<10} {:<32} DOMAINS", "SLUG", "STATUS", "NAME");
                        for t in tenants.list().await? {
                            println!(
                                "{:<24} {:<10} {:<32} {}",
                                t.slug,
                                t.status.as_str(),
                                t.name,
                                t.domains.join(",")
                            );
                        }
                    }
                    TenantCommand::Suspend { slug } => {
                        tenants.set_status(&slug, TenantStatus::Suspended).await?;
                        println!("suspended {slug}");
                    }
                    TenantCommand::Resume { slug } => {
                        tenants.set_status(&slug, TenantStatus::Active).await?;
                        println!("resumed {slug}");
                    }
                }
            }
        }
        Ok(())
    }
}
