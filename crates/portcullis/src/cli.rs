//! `portcullis apikey …` and `portcullis user …`: manage records in the store that
//! the config file names. The embedded store allows several processes, so these work
//! while a gateway runs on the same file.

use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use portcullis_auth::apikey::{ApiKeys, NewKey, Quota};
use portcullis_auth::users::{LegacyRecord, UserError, Users};
use portcullis_gateway::pipelines::{Definition, Mode, PipelineStore};
use portcullis_store::Store;

#[derive(Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key; the raw key is printed alone on the last line (shown once).
    Create {
        principal: String,
        #[arg(long)]
        name: Option<String>,
        /// Quota: requests allowed per window (on routes with `auth.quota`).
        #[arg(long, requires = "window")]
        limit: Option<u64>,
        /// Quota window: `1h`, `1d`, `30s`.
        #[arg(long, requires = "limit")]
        window: Option<humantime::Duration>,
        /// Comma-separated scopes.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Expiry: a duration from now (`30d`) or a Unix timestamp.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by its id or the raw key.
    Revoke { key_or_id: String },
}

#[derive(Subcommand)]
pub enum PipelineCommand {
    /// Store a pipeline (replacing one of the same name); gateways see it at once.
    Add {
        name: String,
        /// Comma-separated function names, in order.
        #[arg(long, value_delimiter = ',', required = true)]
        steps: Vec<String>,
        /// `sequential` (each answer feeds the next step) or `parallel`.
        #[arg(long, default_value = "sequential")]
        mode: String,
    },
    /// List stored pipelines: name, mode, steps.
    #[command(alias = "ls")]
    List,
    /// Print one pipeline's stored JSON.
    Show { name: String },
    /// Remove a pipeline.
    #[command(alias = "rm")]
    Remove { name: String },
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Add a user; the password is read from standard input (first line).
    Add {
        username: String,
        #[arg(long, default_value = "user")]
        role: String,
    },
    /// Set a user's password (read from standard input).
    Passwd { username: String },
    /// Remove a user.
    Remove { username: String },
    /// List users.
    List,
    /// Import Metacogna records: a JSON array of `{username, salt, hash, role}`
    /// (salted SHA-256); each is upgraded to argon2id at its first login.
    Import {
        file: std::path::PathBuf,
        /// Replace users that already exist.
        #[arg(long)]
        overwrite: bool,
    },
}

/// Opens the config's store and runs `f` on it.
pub fn run_blocking<F, Fut>(config: &Path, f: F) -> ExitCode
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let parsed = match portcullis_config::load(config) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let store = portcullis_gateway::open_store(&parsed.store)
            .await
            .map_err(|e| format!("cannot open the store: {e}"))?;
        store
            .ping()
            .await
            .map_err(|e| format!("the store does not answer: {e}"))?;
        f(store).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn parse_expiry(s: &str) -> Result<u64, String> {
    if let Ok(ts) = s.parse::<u64>() {
        return Ok(ts);
    }
    humantime::parse_duration(s)
        .map(|d| now() + d.as_secs())
        .map_err(|e| {
            format!("--expires {s:?}: expected a duration like 30d or a Unix timestamp ({e})")
        })
}

pub async fn apikey(store: Arc<dyn Store>, cmd: ApiKeyCommand) -> Result<(), String> {
    let keys = ApiKeys::new(store, Duration::ZERO, 0);
    match cmd {
        ApiKeyCommand::Create {
            principal,
            name,
            limit,
            window,
            scopes,
            expires,
        } => {
            let quota = match (limit, window) {
                (Some(limit), Some(window)) => Some(Quota {
                    limit,
                    window_secs: Duration::from(window).as_secs().max(1),
                }),
                _ => None,
            };
            let expires_at = expires.as_deref().map(parse_expiry).transpose()?;
            let (raw, record) = keys
                .create(NewKey {
                    principal,
                    name,
                    scopes,
                    expires_at,
                    quota,
                })
                .await
                .map_err(|e| e.to_string())?;
            println!("id: {}", record.id);
            println!("principal: {}", record.principal);
            if let Some(q) = &record.quota {
                println!("quota: {} per {}s", q.limit, q.window_secs);
            }
            println!("The key is shown once; store it now:");
            println!("{raw}");
        }
        ApiKeyCommand::List => {
            for r in keys.list().await.map_err(|e| e.to_string())? {
                let quota = r.quota.as_ref().map_or("-".to_owned(), |q| {
                    format!("{}/{}s", q.limit, q.window_secs)
                });
                let expires = r.expires_at.map_or("-".to_owned(), |e| e.to_string());
                println!(
                    "{}  principal={}  name={}  scopes={}  quota={}  expires_at={}",
                    r.id,
                    r.principal,
                    r.name.as_deref().unwrap_or("-"),
                    if r.scopes.is_empty() {
                        "-".to_owned()
                    } else {
                        r.scopes.join(",")
                    },
                    quota,
                    expires
                );
            }
        }
        ApiKeyCommand::Revoke { key_or_id } => {
            if keys.revoke(&key_or_id).await.map_err(|e| e.to_string())? {
                println!("revoked");
            } else {
                return Err("no such key".into());
            }
        }
    }
    Ok(())
}

fn read_password() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        return Err("no password on standard input".into());
    }
    Ok(password)
}

fn user_error(e: UserError) -> String {
    match e {
        UserError::WeakPassword => "the password is too short (8 characters at least)".into(),
        other => other.to_string(),
    }
}

pub async fn user(store: Arc<dyn Store>, cmd: UserCommand) -> Result<(), String> {
    let users = Users::new(store);
    match cmd {
        UserCommand::Add { username, role } => {
            let password = read_password()?;
            users
                .add(&username, &password, &role)
                .await
                .map_err(user_error)?;
            println!("added {username} ({role})");
        }
        UserCommand::Passwd { username } => {
            let password = read_password()?;
            users
                .set_password(&username, &password)
                .await
                .map_err(user_error)?;
            println!("password changed for {username}");
        }
        UserCommand::Remove { username } => {
            if !users.remove(&username).await.map_err(user_error)? {
                return Err(format!("no user {username:?}"));
            }
            println!("removed {username}");
        }
        UserCommand::List => {
            for u in users.list().await.map_err(user_error)? {
                let scheme = if u.password.is_legacy() {
                    "legacy-sha256"
                } else {
                    "argon2id"
                };
                println!("{}  role={}  password={}", u.username, u.role, scheme);
            }
        }
        UserCommand::Import { file, overwrite } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let records: Vec<LegacyRecord> = serde_json::from_str(&text).map_err(|e| {
                format!("{}: not a JSON array of user records: {e}", file.display())
            })?;
            let n = users
                .import_legacy(records, overwrite)
                .await
                .map_err(user_error)?;
            println!("imported {n} users");
        }
    }
    Ok(())
}

pub async fn pipeline(store: Arc<dyn Store>, cmd: PipelineCommand) -> Result<(), String> {
    let pipelines = PipelineStore::new(&store);
    match cmd {
        PipelineCommand::Add { name, steps, mode } => {
            let mode = Mode::parse(&mode)
                .ok_or_else(|| format!("--mode {mode:?}: sequential or parallel"))?;
            let def = Definition { mode, steps };
            pipelines
                .put(&name, &def)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "stored pipeline {name}: {} ({:?})",
                def.steps.join(" -> "),
                def.mode
            );
        }
        PipelineCommand::List => {
            for (name, def) in pipelines.list(10_000).await.map_err(|e| e.to_string())? {
                match def {
                    Ok(d) => println!("{name}\t{:?}\t{}", d.mode, d.steps.join(",")),
                    Err(e) => println!("{name}\tunreadable\t{e}"),
                }
            }
        }
        PipelineCommand::Show { name } => {
            let def = pipelines
                .get(&name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no pipeline {name:?}"))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&def).map_err(|e| e.to_string())?
            );
        }
        PipelineCommand::Remove { name } => {
            if !pipelines.delete(&name).await.map_err(|e| e.to_string())? {
                return Err(format!("no pipeline {name:?}"));
            }
            println!("removed pipeline {name}");
        }
    }
    Ok(())
}
