//! Starting a `sluice enrich` run: the checks before any file is touched, the stage, and the
//! files opened where the run starts.
//!
//! Owns: the order of start-up. Invariants: nothing is written (no output created, no file
//! truncated) before every check passed: the files' roles, the checkpoint directory's lock and
//! completed marker, Redis answering; a resume cuts every file back to what its checkpoint
//! committed, and only after the settings were found the same.

use super::backend::{BackendConfig, BackendError};
use super::budget::Budget;
use super::files::{DeadLetters, LineFile, Target};
use super::guard::{self, DirLock, Role};
use super::reader::ReaderInput;
use super::record::Line;
use super::{
    completed_marker, lookup, resume, EnrichConfig, EnrichError, Enriched, Lookup, OnBadRecord,
    OnFailedLookup, RetrySpec,
};
use crate::checkpoint::{Checkpointing, RestoreInfo};
use crate::http::HttpEndpoint;
use crate::lookup::Sinks;
use crate::postgres::{PgConfig, PgEndpoint, PgError, Which};
use crate::redis::{ClientConfig, Endpoint, Server};
use crate::{OutputMode, ShardContext, Stage, StageBuilder};
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Requests a connection may have on the wire per lookup slot of the stage (see `start_stage`).
const REQUESTS_PER_SLOT: usize = 2;
/// How long the check that Redis answers may take to connect before the run starts.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long it waits for the PING's reply (a slower server is taken as reachable).
const PING_WAIT: Duration = Duration::from_secs(1);

/// The dead-letter files the policies name, each once.
/// The dead-letter files (none with NATS ends: their dead letters go to subjects).
pub(crate) fn dead_letter_paths(config: &EnrichConfig) -> Vec<PathBuf> {
    if config.nats.is_some() {
        return vec![];
    }
    dead_letter_targets(config)
}

/// Every dead-letter target the policies name, files or `nats://` subjects.
pub(crate) fn dead_letter_targets(config: &EnrichConfig) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = [
        match &config.on_bad_record {
            OnBadRecord::DeadLetter(p) => Some(p.clone()),
            _ => None,
        },
        match &config.on_timeout {
            OnFailedLookup::DeadLetter(p) => Some(p.clone()),
            _ => None,
        },
        match &config.on_error {
            OnFailedLookup::DeadLetter(p) => Some(p.clone()),
            _ => None,
        },
    ]
    .into_iter()
    .flatten()
    .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// The settings that shape the output, recorded with checkpoints.
pub(crate) fn output_settings(config: &EnrichConfig) -> serde_json::Value {
    let show = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let mut settings = serde_json::json!({
        "backend": config.backend,
        "key": config.key.source(),
        "input": show(&config.input),
        "output": show(&config.output),
        "placement": format!("{:?}", config.placement),
        "on_missing": format!("{:?}", config.on_missing),
        "missing_marker": config.missing_marker,
        "on_bad_record": format!("{:?}", config.on_bad_record),
        "on_timeout": format!("{:?}", config.on_timeout),
        "on_error": format!("{:?}", config.on_error),
        "mode": format!("{:?}", config.mode),
        "event_time": config.event_time,
        "max_out_of_orderness_ms": config.max_out_of_orderness.as_millis() as u64,
        "emit_watermarks": config.emit_watermarks,
    });
    // Strings, the default, leave `value` out: a run over strings records the same settings
    // whether or not it says what its keys hold.
    if config.value != crate::lookup::ValueKind::String {
        settings["value"] = format!("{:?}", config.value).into();
    }
    settings
}

/// Checks what can be checked before any file is written: the files' roles, the checkpoint
/// directory (locked for the run), the completed marker, and that Redis answers.
/// What the preflight found: the checkpoint directory's lock, whether the run already
/// completed, and whether the server is a Redis Cluster node.
pub(crate) struct Preflight {
    pub lock: Option<DirLock>,
    pub completed: bool,
    pub cluster: bool,
}

pub(crate) fn preflight(config: &EnrichConfig) -> Result<Preflight, EnrichError> {
    super::nats_io::check_dead_letters(config.nats.as_ref(), &dead_letter_targets(config))
        .map_err(EnrichError::Usage)?;
    let dead = dead_letter_paths(config);
    let mut roles = vec![];
    if let Some(p) = &config.input {
        roles.push(Role {
            what: "--input",
            path: p,
        });
    }
    if let Some(p) = &config.output {
        roles.push(Role {
            what: "--output",
            path: p,
        });
    }
    roles.extend(dead.iter().map(|p| Role {
        what: "dead-letter file",
        path: p,
    }));
    guard::distinct_files(&roles)?;
    let mut lock = None;
    if let Some(dir) = &config.checkpoint_dir {
        if config.input.is_none() || config.output.is_none() {
            return Err(EnrichError::Usage(format!(
                "--checkpoint-dir {} needs --input FILE and --output FILE: standard input \
                 cannot be re-read from an offset, nor standard output cut back on resume",
                dir.display()
            )));
        }
        lock = Some(DirLock::acquire(dir)?);
        if completed_marker(dir).exists() {
            return Ok(Preflight {
                lock,
                completed: true,
                cluster: false,
            });
        }
    }
    let cluster = match &config.backend_config {
        BackendConfig::Redis(endpoint) => redis_answers(endpoint, config.tracking)?,
        BackendConfig::Http { endpoint, client } => {
            http_answers(endpoint, client.connect_timeout)?;
            false
        }
        BackendConfig::Postgres {
            endpoint,
            client,
            params,
        } => {
            postgres_answers(endpoint, client, *params)?;
            false
        }
    };
    Ok(Preflight {
        lock,
        completed: false,
        cluster,
    })
}

/// Connects to the HTTP server, so that one that is not there is said before any line is read
/// or any file created (no request is sent: the API's own paths are the records').
fn http_answers(endpoint: &HttpEndpoint, timeout: Duration) -> Result<(), EnrichError> {
    std::net::TcpStream::connect_timeout(&endpoint.addr, timeout)
        .map(drop)
        .map_err(|e| EnrichError::Backend {
            server: endpoint.to_string(),
            flag: "--http",
            reason: format!("does not answer: {e}; check --http and that the server runs"),
        })
}

/// Connects to PostgreSQL, logs in and prepares the statements, so that an unreachable
/// server, a wrong login, a missing table or a query the server cannot prepare is said before
/// any line is read or any file created; and checks that the query takes as many parameters as
/// `--params` gives, and the batch query one.
fn postgres_answers(
    endpoint: &PgEndpoint,
    client: &PgConfig,
    params: usize,
) -> Result<(), EnrichError> {
    let failed = |flag: &'static str, reason: String| EnrichError::Backend {
        server: endpoint.to_string(),
        flag,
        reason,
    };
    let prepared = crate::postgres::handshake::check_blocking(
        endpoint,
        &client.statements,
        client.connect_timeout,
    )
    .map_err(|e| match e {
        PgError::Connect { reason, .. } => failed(
            "--postgres",
            format!("does not answer: {reason}; check --postgres and that the server runs"),
        ),
        PgError::Refused {
            reason,
            statement: Some(which),
            ..
        } => match which {
            Which::Query => failed("--query", reason),
            Which::BatchQuery => failed("--batch-query", reason),
        },
        other => failed("--postgres", other.to_string()),
    })?;
    if prepared.query.params != params {
        return Err(failed(
            "--params",
            format!(
                "the query takes {} parameters ($1..) and --params gives {params}: give one \
                 --params template per parameter, in order",
                prepared.query.params
            ),
        ));
    }
    if let Some(batch) = &prepared.batch_query {
        if batch.params != 1 {
            return Err(failed(
                "--batch-query",
                format!(
                    "takes {} parameters; it takes one, $1, the keys as an array \
                     (... WHERE id = ANY($1))",
                    batch.params
                ),
            ));
        }
    }
    Ok(())
}

/// Connects to Redis, logs in (`AUTH`, `SELECT`) and sends a PING (and with client tracking a
/// `HELLO 3`, which a server older than Redis 6 refuses), so that an unreachable server, a
/// wrong password or a server that refuses commands is said before any line is read or any
/// file created. A server that is slow to answer is taken as reachable: the run's timeout
/// policy handles slowness.
/// Whether the server is a Redis Cluster node (`INFO cluster` says `cluster_enabled:1`).
fn redis_answers(endpoint: &Endpoint, tracking: bool) -> Result<bool, EnrichError> {
    let addr = endpoint.server.clone();
    let failed = |reason: String| EnrichError::Backend {
        server: addr.to_string(),
        flag: "--redis",
        reason,
    };
    let unreachable = |e: std::io::Error| {
        failed(format!(
            "does not answer: {e}; check --redis and that the server runs"
        ))
    };
    let mut stream: Box<dyn ReadWrite> = match &endpoint.server {
        Server::Tcp(a) => {
            let mut s =
                std::net::TcpStream::connect_timeout(a, PREFLIGHT_TIMEOUT).map_err(unreachable)?;
            s.set_read_timeout(Some(PING_WAIT)).map_err(unreachable)?;
            match &endpoint.tls {
                None => Box::new(s),
                Some(tls) => {
                    let config = crate::redis::tls::client_config(tls).map_err(&failed)?;
                    let name = crate::redis::tls::server_name(&endpoint.host).map_err(&failed)?;
                    let mut conn = rustls::ClientConnection::new(config, name)
                        .map_err(|e| failed(format!("TLS: {e}")))?;
                    while conn.is_handshaking() {
                        conn.complete_io(&mut s)
                            .map_err(|e| failed(format!("TLS handshake: {e}")))?;
                    }
                    Box::new(rustls::StreamOwned::new(conn, s))
                }
            }
        }
        Server::Unix(path) => {
            let s = std::os::unix::net::UnixStream::connect(path).map_err(unreachable)?;
            s.set_read_timeout(Some(PING_WAIT)).map_err(unreachable)?;
            Box::new(s)
        }
    };
    let mut commands = endpoint.login();
    commands.push(("PING".into(), vec![b"PING".to_vec()]));
    commands.push((
        "INFO cluster".into(),
        vec![b"INFO".to_vec(), b"cluster".to_vec()],
    ));
    if tracking {
        commands.push((
            "HELLO 3 (--cache-invalidation tracking needs Redis 6 or newer)".into(),
            vec![b"HELLO".to_vec(), b"3".to_vec()],
        ));
    }
    let mut cluster = false;
    for (name, command) in &commands {
        let args: Vec<&[u8]> = command.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        crate::redis::encode_command(&mut out, &args);
        stream.write_all(&out).map_err(unreachable)?;
        let mut reply = [0u8; 512];
        let n = match stream.read(&mut reply) {
            Ok(0) => return Err(failed(format!("closed the connection after {name}"))),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(unreachable(e))
            }
            Err(_) => return Ok(cluster), // slow, or interrupted: reachable
        };
        let reply = &reply[..n];
        let text = || {
            String::from_utf8_lossy(&reply[1..reply.len().min(200)])
                .trim_end()
                .to_string()
        };
        match reply.first() {
            Some(b'-') => return Err(failed(format!("refused {name}: {}", text()))),
            Some(b'+') if name == "PING" && !reply.starts_with(b"+PONG") => {
                return Err(failed("does not speak Redis (no PONG to PING)".into()))
            }
            Some(b'%') if name.starts_with("HELLO") => {}
            Some(b'$') if name == "INFO cluster" => {
                cluster = String::from_utf8_lossy(reply).contains("cluster_enabled:1");
            }
            _ if name.starts_with("HELLO") => {
                return Err(failed(format!("{name} answered {}", text())))
            }
            Some(b'+') => {}
            _ => {
                return Err(failed(format!(
                    "does not speak Redis (answered {name} with {})",
                    text()
                )))
            }
        }
    }
    Ok(cluster)
}

/// A blocking socket of either kind, for the preflight.
trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// Builds and starts the stage (restoring a checkpoint in the directory, if any).
pub(crate) fn start_stage(
    config: &EnrichConfig,
    cluster: bool,
    budget: &Arc<Budget>,
) -> Result<(Stage<Arc<Line>, Enriched>, Sinks), EnrichError> {
    let (builder, sinks) = stage_builder(config, cluster, budget);
    let stage = builder
        .start()
        .map_err(|e| EnrichError::Stage(e.to_string()))?;
    Ok((stage, sinks))
}

/// Checks a restored checkpoint's settings against this run's (or records this run's in a
/// fresh directory), and says which newer checkpoints were skipped.
pub(crate) fn check_restored(
    config: &EnrichConfig,
    restored: Option<&RestoreInfo>,
) -> Result<(), EnrichError> {
    if let Some(dir) = &config.checkpoint_dir {
        let settings = output_settings(config);
        match restored {
            Some(r) => guard::check_settings(dir, r.checkpoint_id, &settings)?,
            None => guard::record_settings(dir, &settings)?,
        }
    }
    for skipped in restored.iter().flat_map(|r| &r.skipped) {
        eprintln!("sluice enrich: {skipped}");
    }
    Ok(())
}

/// The stage's settings: the lookup per shard, capacity, timeout, mode, retries, key and
/// checkpoints; and
/// where its shards add their wire times and layer figures.
pub(crate) fn stage_builder(
    config: &EnrichConfig,
    cluster: bool,
    budget: &Arc<Budget>,
) -> (
    StageBuilder<lookup::Enrich, impl Fn(ShardContext) -> lookup::Enrich + Send + Sync>,
    Sinks,
) {
    let backend = config.backend_config.clone();
    // Requests on the wire per connection stay within twice the capacity: room for the
    // lookups in flight and as many abandoned by a timeout whose replies are still owed.
    // Against a stalled server the rest wait for a slot (not sent) until their timeout.
    let client = ClientConfig {
        connections: config.connections,
        max_in_flight: config.capacity.saturating_mul(REQUESTS_PER_SLOT).max(1),
        tracking: config.tracking,
        ..ClientConfig::default()
    };
    // Each shard adds its wire times and layer figures here when it closes its function.
    let sinks = Sinks::new();
    let (shard_sinks, budget, layer) = (sinks.clone(), budget.clone(), config.layer.clone());
    let value = config.value.clone();
    let mut builder = Stage::builder(move |shard| {
        let layer = layer.for_shard(shard.shards);
        let parts = lookup::BackendParts {
            backend: &backend,
            redis: &client,
            cluster,
            value: &value,
        };
        lookup::Enrich::new(parts, layer, shard_sinks.clone(), budget.clone())
    })
    .capacity(config.capacity)
    .timeout(config.timeout)
    .mode(config.mode)
    .retry({
        let policy = config
            .retry
            .policy(|e: &lookup::EnrichError| e.is_retryable(BackendError::is_retryable));
        if config.retry_missing && config.retry != RetrySpec::None {
            policy.on_result(|outs: &[Enriched]| outs.iter().any(|e| e.lookup == Lookup::Missing))
        } else {
            policy
        }
    });
    if let Some(shards) = config.shards {
        builder = builder.shards(shards);
    }
    if config.mode == OutputMode::KeyOrdered {
        builder = builder.key_by(|l: &Arc<Line>| match &**l {
            Line::Record(r) => crate::hash_key(&r.key),
            Line::Bad(b) => b.line,
        });
    }
    if let Some(dir) = &config.checkpoint_dir {
        builder = builder.checkpointing(Checkpointing::new(
            dir,
            resume::line_codec(),
            resume::enriched_codec(),
        ));
    }
    (builder, sinks)
}

/// The files a run reads and writes, opened where it starts.
pub(crate) struct Files {
    pub input: ReaderInput,
    pub output: LineFile,
    pub dead_letters: DeadLetters,
}

/// Opens the input at the restored position and the output and dead-letter files cut back to
/// what the restored checkpoint committed (or emptied for a fresh run).
pub(crate) fn open_files(
    config: &EnrichConfig,
    restored: Option<&RestoreInfo>,
) -> Result<Files, EnrichError> {
    let input = match &config.input {
        None => ReaderInput {
            input: Box::new(std::io::BufReader::new(std::io::stdin())) as Box<dyn BufRead + Send>,
            offset: 0,
            line: 0,
            hasher: crc32fast::Hasher::new(),
        },
        Some(p) => {
            let source = resume::open_source(p, restored)?;
            ReaderInput {
                input: Box::new(source.reader),
                offset: source.offset,
                line: source.lines,
                hasher: source.hasher,
            }
        }
    };
    let output = match &config.output {
        None => LineFile::new("output".into(), Target::Stdout(std::io::stdout())),
        Some(p) => {
            let committed = restored.map(|r| (r.checkpoint_id, r.sink_position));
            let file = resume::open_appending(p, committed, "output")?;
            LineFile::new(format!("output {}", p.display()), Target::File(file))
        }
    };
    let mut dead_letters = DeadLetters::default();
    for path in dead_letter_paths(config) {
        let committed = match restored {
            None => None,
            Some(r) => {
                let name = DeadLetters::side_output_name(&path);
                let position = r.side_outputs.get(&name).copied().unwrap_or(0);
                Some((r.checkpoint_id, position))
            }
        };
        let file = resume::open_appending(&path, committed, "dead-letter file")?;
        dead_letters.insert(path, file);
    }
    Ok(Files {
        input,
        output,
        dead_letters,
    })
}
