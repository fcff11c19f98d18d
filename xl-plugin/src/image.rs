//! `xl-snap image …`: qcow2 images with disk checkpoints.
//!
//! Every operation is a [`Request`] executed on an open image by [`execute`]. When the image
//! is being served (`xl-snap image serve`), the CLI sends the request to the server's control
//! socket instead of opening the file, so checkpoints can be taken while clients write.
//! Otherwise the CLI opens the image itself under an exclusive lock.

use crate::control;
use crate::size::parse_size;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use xensnap_blockdev::BlockDevice;
use xensnap_qcow2::{CheckpointDevice, CreateOptions, OpenOptions, Qcow2, SharedImage};

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Create a qcow2 v3 image.
    Create {
        file: PathBuf,
        /// Virtual disk size (e.g. 10G).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Cluster size, a power of two from 512 to 2M [default: the engine's, 16k; see
        /// blkback-snap/qcow2/CLUSTER-SIZE.md for the trade-off].
        #[arg(long, value_parser = parse_size)]
        cluster_size: Option<u64>,
        /// Refcount width in bits (1, 2, 4, 8, 16, 32 or 64).
        #[arg(long, default_value_t = 16)]
        refcount_bits: u32,
    },
    /// Show the image's header facts.
    Info(ReadArgs),
    /// Check the image's consistency (refcounts, COPIED flags, overlaps).
    Check {
        #[command(flatten)]
        read: ReadArgs,
        /// Repair what can be repaired (leaks, refcounts, COPIED flags).
        #[arg(long)]
        repair: bool,
    },
    /// Disk checkpoints (qcow2 internal snapshots).
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// Show which host clusters back the disk or a checkpoint, and which are shared.
    Map {
        #[command(flatten)]
        read: ReadArgs,
        /// Map this checkpoint (id or name) instead of the active disk.
        #[arg(long)]
        checkpoint: Option<String>,
    },
    /// Serve the image over NBD: the active disk read-write as export "" (or "active"),
    /// every checkpoint read-only as "checkpoint/<name>".
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct ReadArgs {
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum CheckpointCmd {
    /// Take a checkpoint of the disk (returns when it is durable, unless --no-wait).
    Create {
        file: PathBuf,
        name: String,
        #[arg(long)]
        json: bool,
        /// On a served image: return once the checkpoint is taken (the point in time is
        /// fixed); the server makes it durable in the background (see `list`).
        #[arg(long)]
        no_wait: bool,
    },
    /// List checkpoints.
    List(ReadArgs),
    /// Bring the disk back to a checkpoint (id or name).
    Revert {
        file: PathBuf,
        checkpoint: String,
        /// On a served image: return once the switch is made; refcount work continues in
        /// the background.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a checkpoint (id or name) and free what only it used.
    Delete { file: PathBuf, checkpoint: String },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    file: PathBuf,
    /// TCP address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long)]
    listen: Option<String>,
    /// Unix socket to listen on.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Control socket path [default: <file>.xensnap.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Serve the active disk read-only.
    #[arg(long)]
    read_only: bool,
}

/// One operation on an open image; also the control socket's request format.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Info,
    Check {
        repair: bool,
    },
    CheckpointCreate {
        name: String,
        /// Return when taken instead of when durable.
        #[serde(default)]
        no_wait: bool,
    },
    CheckpointList,
    CheckpointRevert {
        checkpoint: String,
        #[serde(default)]
        no_wait: bool,
    },
    CheckpointDelete {
        checkpoint: String,
    },
    Map {
        checkpoint: Option<String>,
    },
    Flush,
}

impl Request {
    fn mutates(&self) -> bool {
        match self {
            Request::Info | Request::CheckpointList | Request::Map { .. } => false,
            Request::Check { repair } => *repair,
            _ => true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{path}: {source}")]
    Image { path: String, source: xensnap_qcow2::Error },
    #[error("{0}")]
    Other(String),
}

fn image_err(path: &Path) -> impl FnOnce(xensnap_qcow2::Error) -> CliError + '_ {
    move |source| CliError::Image { path: path.display().to_string(), source }
}

/// Run `req` on an open image; the result is JSON (printed as text by [`print_result`]).
pub fn execute(img: &mut Qcow2, req: &Request) -> Result<Value, xensnap_qcow2::Error> {
    Ok(match req {
        Request::Info => json!(img.info()),
        Request::Check { repair } => {
            let report = if *repair { img.repair()? } else { img.check()? };
            json!(report)
        }
        Request::CheckpointCreate { name, no_wait: true } => json!(img.checkpoint_take(name)?),
        Request::CheckpointCreate { name, no_wait: false } => json!(img.checkpoint_create(name)?),
        Request::CheckpointList => json!(img.checkpoint_list()),
        Request::CheckpointRevert { checkpoint, no_wait } => {
            if *no_wait {
                img.checkpoint_revert_switch(checkpoint)?;
            } else {
                img.checkpoint_revert(checkpoint)?;
            }
            json!({ "reverted": checkpoint })
        }
        Request::CheckpointDelete { checkpoint } => {
            img.checkpoint_delete(checkpoint)?;
            json!({ "deleted": checkpoint })
        }
        Request::Map { checkpoint } => json!(img.map(checkpoint.as_deref())?),
        Request::Flush => {
            img.flush()?;
            json!({ "flushed": true })
        }
    })
}

pub fn default_control_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".xensnap.sock");
    PathBuf::from(s)
}

/// Take the advisory lock that keeps two writers off one image. Readers share it.
fn lock_image(path: &Path, exclusive: bool) -> Result<File, CliError> {
    let f = File::open(path).map_err(|e| CliError::Other(format!("{}: {e}", path.display())))?;
    let r = if exclusive { f.try_lock() } else { f.try_lock_shared() };
    match r {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(CliError::Other(format!(
            "{}: the image is in use by another process (served by `xl-snap image serve` or a \
             backend) and its control socket {} does not answer",
            path.display(),
            default_control_path(path).display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(CliError::Other(format!("{}: cannot lock: {e}", path.display()))),
    }
}

/// Run a request on the image at `file`: through its server if it is served, else directly.
fn run_request(file: &Path, req: Request) -> Result<Value, CliError> {
    let ctl = default_control_path(file);
    if let Some(result) = control::try_call(&ctl, &req)? {
        return result.map_err(|msg| CliError::Other(format!("{}: {msg}", file.display())));
    }
    let _lock = lock_image(file, req.mutates())?;
    // Without a server nobody would finish background work after this process exits.
    let req = match req {
        Request::CheckpointCreate { name, .. } => Request::CheckpointCreate { name, no_wait: false },
        Request::CheckpointRevert { checkpoint, .. } => Request::CheckpointRevert { checkpoint, no_wait: false },
        other => other,
    };
    let mut img = Qcow2::open_file(file, &OpenOptions { read_only: !req.mutates() }).map_err(image_err(file))?;
    let out = execute(&mut img, &req).map_err(image_err(file))?;
    img.close().map_err(image_err(file))?;
    Ok(out)
}

pub fn run(cmd: ImageCmd) -> Result<(), CliError> {
    match cmd {
        ImageCmd::Create { file, size, cluster_size, refcount_bits } => {
            let cluster_size = cluster_size.unwrap_or(1 << CreateOptions::default().cluster_bits);
            if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
                return Err(CliError::Other(format!(
                    "--cluster-size {cluster_size}: must be a power of two from 512 to 2M"
                )));
            }
            if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
                return Err(CliError::Other(format!(
                    "--refcount-bits {refcount_bits}: must be 1, 2, 4, 8, 16, 32 or 64"
                )));
            }
            let opts = CreateOptions {
                size,
                cluster_bits: cluster_size.trailing_zeros(),
                refcount_order: refcount_bits.trailing_zeros(),
            };
            let img = Qcow2::create_file(&file, &opts).map_err(image_err(&file))?;
            img.close().map_err(image_err(&file))?;
            println!("Formatting '{}', fmt=qcow2 size={size} cluster_size={cluster_size}", file.display());
            Ok(())
        }
        ImageCmd::Info(a) => print_result(&a, "info", run_request(&a.file, Request::Info)?),
        ImageCmd::Check { read, repair } => {
            let v = run_request(&read.file, Request::Check { repair })?;
            let clean = v.get("errors").and_then(Value::as_array).is_none_or(|e| e.is_empty())
                && v.get("leaks").and_then(Value::as_u64).unwrap_or(0) == 0
                && v.get("corruptions").and_then(Value::as_u64).unwrap_or(0) == 0;
            print_result(&read, "check", v)?;
            if clean || repair {
                Ok(())
            } else {
                Err(CliError::Other(format!("{}: check found problems", read.file.display())))
            }
        }
        ImageCmd::Checkpoint(c) => match c {
            CheckpointCmd::Create { file, name, json, no_wait } => {
                let v = run_request(&file, Request::CheckpointCreate { name, no_wait })?;
                print_result(&ReadArgs { file, json }, "checkpoint-create", v)
            }
            CheckpointCmd::List(a) => {
                print_result(&a, "checkpoint-list", run_request(&a.file, Request::CheckpointList)?)
            }
            CheckpointCmd::Revert { file, checkpoint, no_wait } => {
                run_request(&file, Request::CheckpointRevert { checkpoint: checkpoint.clone(), no_wait })?;
                println!("{}: reverted to checkpoint {checkpoint}", file.display());
                Ok(())
            }
            CheckpointCmd::Delete { file, checkpoint } => {
                run_request(&file, Request::CheckpointDelete { checkpoint: checkpoint.clone() })?;
                println!("{}: deleted checkpoint {checkpoint}", file.display());
                Ok(())
            }
        },
        ImageCmd::Map { read, checkpoint } => {
            let v = run_request(&read.file, Request::Map { checkpoint })?;
            print_result(&read, "map", v)
        }
        ImageCmd::Serve(a) => serve(a),
    }
}

fn print_result(a: &ReadArgs, what: &str, v: Value) -> Result<(), CliError> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).map_err(|e| CliError::Other(e.to_string()))?);
        return Ok(());
    }
    match what {
        "checkpoint-list" => {
            let empty = vec![];
            let list = v.as_array().unwrap_or(&empty);
            if list.is_empty() {
                println!("{}: no checkpoints", a.file.display());
                return Ok(());
            }
            println!("{:<6} {:<24} {:>10} {:<20} {:>9} STATE", "ID", "NAME", "VM SIZE", "DATE", "DISK");
            for s in list {
                let date = s.get("date_sec").and_then(Value::as_u64).unwrap_or(0);
                println!(
                    "{:<6} {:<24} {:>10} {:<20} {:>9} {}",
                    s.get("id").and_then(Value::as_str).unwrap_or("?"),
                    s.get("name").and_then(Value::as_str).unwrap_or("?"),
                    s.get("vm_state_size").and_then(Value::as_u64).unwrap_or(0),
                    format_date(date),
                    human(s.get("disk_size").and_then(Value::as_u64).unwrap_or(0)),
                    s.get("state").and_then(Value::as_str).unwrap_or("?"),
                );
            }
        }
        "map" => {
            let empty = vec![];
            println!("{:<18} {:<18} {:<18} {:<12} {:>4} SHARED", "GUEST", "LENGTH", "HOST", "KIND", "REF");
            for m in v.as_array().unwrap_or(&empty) {
                let g = |k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
                let host = m.get("host_offset").and_then(Value::as_u64).map(|h| format!("{h:#x}"));
                println!(
                    "{:<#18x} {:<#18x} {:<18} {:<12} {:>4} {}",
                    g("guest_offset"),
                    g("length"),
                    host.as_deref().unwrap_or("-"),
                    m.get("kind").and_then(Value::as_str).unwrap_or("?"),
                    g("refcount"),
                    if m.get("shared").and_then(Value::as_bool).unwrap_or(false) { "shared" } else { "owned" },
                );
            }
        }
        _ => {
            if let Some(obj) = v.as_object() {
                for (k, val) in obj {
                    match val {
                        Value::Array(items) if items.is_empty() => println!("{k}: none"),
                        Value::Array(items) => {
                            println!("{k}:");
                            for i in items {
                                println!("  {}", i.as_str().map(str::to_owned).unwrap_or_else(|| i.to_string()));
                            }
                        }
                        Value::String(s) => println!("{k}: {s}"),
                        other => println!("{k}: {other}"),
                    }
                }
            } else {
                println!("{v}");
            }
        }
    }
    Ok(())
}

fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = n as f64;
    let mut i = 0;
    while x >= 1024.0 && i < U.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", U[i])
    }
}

/// UTC date from seconds since the epoch (civil-from-days, no time zone database).
fn format_date(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The exports of a served image: the active disk and, by name, every checkpoint.
struct ImageExports {
    img: Arc<Mutex<Qcow2>>,
    read_only: bool,
}

impl xensnap_nbd::ExportRegistry for ImageExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        match name {
            "" | "active" => {
                let dev: Arc<dyn BlockDevice> = Arc::new(SharedImage(self.img.clone()));
                Some(if self.read_only { Arc::new(xensnap_blockdev::ReadOnly(dev)) } else { dev })
            }
            _ => {
                let ck = name.strip_prefix("checkpoint/")?;
                let dev = CheckpointDevice::new(self.img.clone(), ck).ok()?;
                Some(Arc::new(dev))
            }
        }
    }

    fn list(&self) -> Vec<(String, String)> {
        let mut out = vec![("active".to_string(), "the active disk".to_string())];
        if let Ok(img) = self.img.lock() {
            for s in img.checkpoint_list() {
                out.push((format!("checkpoint/{}", s.name), format!("checkpoint {} (read-only)", s.id)));
            }
        }
        out
    }
}

/// Make taken checkpoints (and switched reverts, begun deletes) durable in the background
/// for as long as the image is served (`SharedImage::drive_durability`, looking for new
/// work every 5 ms).
fn spawn_durability(img: Arc<Mutex<Qcow2>>) {
    let shared = SharedImage(img);
    std::thread::spawn(move || shared.drive_durability(Some(std::time::Duration::from_millis(5))));
}

fn serve(a: ServeArgs) -> Result<(), CliError> {
    let file = a.file.clone();
    let _lock = lock_image(&file, true)?;
    let img = Qcow2::open_file(&file, &OpenOptions { read_only: a.read_only }).map_err(image_err(&file))?;
    let img = Arc::new(Mutex::new(img));
    let registry = Arc::new(ImageExports { img: img.clone(), read_only: a.read_only });
    let server = Arc::new(xensnap_nbd::Server::new(registry));
    let mut threads = Vec::new();

    if a.listen.is_none() && a.socket.is_none() {
        return Err(CliError::Other("serve: give --listen ADDR and/or --socket PATH".into()));
    }
    if let Some(addr) = &a.listen {
        let l = std::net::TcpListener::bind(addr)
            .map_err(|e| CliError::Other(format!("serve: cannot listen on {addr}: {e}")))?;
        let local = l.local_addr().map_err(|e| CliError::Other(e.to_string()))?;
        println!("nbd://{local}/");
        let s = server.clone();
        threads.push(std::thread::spawn(move || s.serve_tcp(l)));
    }
    if let Some(path) = &a.socket {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| CliError::Other(format!("serve: cannot bind {}: {e}", path.display())))?;
        println!("nbd+unix:///?socket={}", path.display());
        let s = server.clone();
        threads.push(std::thread::spawn(move || s.serve_unix(l)));
    }
    let ctl_path = a.control.clone().unwrap_or_else(|| default_control_path(&file));
    let ctl = control::bind(&ctl_path, img.clone())
        .map_err(|e| CliError::Other(format!("serve: control socket {}: {e}", ctl_path.display())))?;
    println!("control {}", ctl_path.display());
    spawn_durability(img.clone());
    use std::io::Write;
    let _ = std::io::stdout().flush();

    // Run until SIGINT/SIGTERM, then finish background work and flush.
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .map_err(|e| CliError::Other(format!("serve: signals: {e}")))?;
    let sig = signals.forever().next();
    tracing::info!(?sig, "stopping");
    drop(ctl); // stops accepting, removes the socket
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    let mut guard = img.lock().map_err(|_| CliError::Other("serve: image lock poisoned".into()))?;
    guard.wait_durable().map_err(image_err(&file))?;
    // The NBD, control and durability threads still hold the image, so it is not closed;
    // finishing the background work and flushing is what closing would do (the lazy dirty
    // bit is cleared once nothing is pending), and the process exits with the lock held.
    guard.flush().map_err(image_err(&file))?;
    Ok(())
}
