//! `blkback-snap`: the daemon (see the crate docs and hooks/README.md).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use blkback_snap::control;
use blkback_snap::device::{self, ServeOptions};
use blkback_snap::image::Format;
use blkback_snap::watch;
use blkback_snap::xen::{XenBinder, XenGrants, XsStore};
use clap::{Parser, Subcommand};
use xensnap_blkif::Features;

#[derive(Parser)]
#[command(name = "blkback-snap", version, about = "Userspace Xen blkif backend serving qcow2/raw images")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// dom0 service: start a serving process for every new vbd whose hotplug script is ours.
    Watch {
        /// Basename of the hotplug script that marks our disks (disk spec `script=NAME`).
        #[arg(long, default_value = "xensnap")]
        script_name: String,
        /// Where each serving process logs.
        #[arg(long, default_value = "/var/log/xen")]
        log_dir: PathBuf,
        /// Control socket directory passed to the serving processes.
        #[arg(long, default_value = "/run/xensnap")]
        socket_dir: PathBuf,
        /// Start even though the kernel's xen-blkback is loaded (it would fight over the devices).
        #[arg(long)]
        allow_kernel_blkback: bool,
    },
    /// Serve one backend directory, e.g. /local/domain/0/backend/vbd/3/51712, until it is removed.
    Serve {
        #[arg(long)]
        backend: String,
        /// Force the image format (default: qcow2 if the file name ends in .qcow2, else raw).
        #[arg(long)]
        format: Option<String>,
        #[arg(long, default_value = "/run/xensnap")]
        socket_dir: PathBuf,
        /// Do not also listen on <image>.xensnap.sock.
        #[arg(long)]
        no_image_socket: bool,
        /// feature-max-indirect-segments (0 disables indirect descriptors).
        #[arg(long, default_value_t = 256)]
        max_indirect_segments: u32,
        /// max-ring-page-order (0..=4).
        #[arg(long, default_value_t = 4)]
        max_ring_page_order: u32,
        /// I/O threads per ring (0 = one request at a time in the ring's thread; at most 64).
        /// Default: $BLKBACK_SNAP_IO_THREADS, else 4.
        #[arg(long)]
        io_threads: Option<u32>,
        #[arg(long)]
        allow_kernel_blkback: bool,
    },
    /// Check a qcow2 image that is not being served (read-only; exit 1 unless clean).
    CheckImage { path: PathBuf },
    /// Send one JSON request to a control socket and print the reply's result.
    Ctl {
        /// Socket path, or DOMID/DEVID for <socket-dir>/blkback-DOMID-DEVID.sock.
        target: String,
        /// The request, e.g. '{"op":"status"}', or just an op name like status / quiesce / resume.
        request: String,
        #[arg(long, default_value = "/run/xensnap")]
        socket_dir: PathBuf,
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
    },
}

/// Print to stdout; a closed pipe (`| grep -q`) is not an error.
fn print_out(s: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{s}");
}

const KERNEL_BLKBACK: &str = "/sys/bus/xen-backend/drivers/vbd";

fn kernel_check(allow: bool) -> Result<(), String> {
    if !allow && std::path::Path::new(KERNEL_BLKBACK).exists() {
        return Err(format!(
            "the kernel's xen-blkback driver is loaded ({KERNEL_BLKBACK} exists): it claims every vbd \
             of this domain and would fight blkback-snap over the same rings. Unload it \
             (`rmmod xen-blkback`) and blacklist it, or pass --allow-kernel-blkback"
        ));
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLKBACK_SNAP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let code = match run(Cli::parse()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("blkback-snap: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Watch { script_name, log_dir, socket_dir, allow_kernel_blkback } => {
            kernel_check(allow_kernel_blkback)?;
            let mut serve_args = vec!["--socket-dir".to_string(), socket_dir.display().to_string()];
            if allow_kernel_blkback {
                serve_args.push("--allow-kernel-blkback".into());
            }
            watch::run(&watch::WatchOptions { script_name, log_dir, serve_args })
        }
        Cmd::Serve {
            backend,
            format,
            socket_dir,
            no_image_socket,
            max_indirect_segments,
            max_ring_page_order,
            io_threads,
            allow_kernel_blkback,
        } => {
            kernel_check(allow_kernel_blkback)?;
            let workers = match io_threads {
                Some(n) => n,
                None => match std::env::var("BLKBACK_SNAP_IO_THREADS") {
                    Ok(v) => v.trim().parse().map_err(|_| format!("BLKBACK_SNAP_IO_THREADS={v:?} is not a number"))?,
                    Err(_) => Features::default().workers,
                },
            };
            if workers > xensnap_blkif::backend::MAX_WORKERS {
                return Err(format!("--io-threads {workers}: at most {}", xensnap_blkif::backend::MAX_WORKERS));
            }
            let format = match format {
                None => None,
                Some(f) => Some(Format::parse(&f).ok_or(format!("unknown format {f} (qcow2|raw)"))?),
            };
            let opts = ServeOptions {
                format,
                socket_dir,
                image_socket: !no_image_socket,
                features: Features { max_indirect_segments, max_ring_page_order, workers, ..Features::default() },
                ..ServeOptions::default()
            };
            let store = Arc::new(XsStore::open().map_err(|e| e.to_string())?);
            let grants = Arc::new(XenGrants::open().map_err(|e| e.to_string())?);
            let stop = AtomicBool::new(false);
            let out = device::serve(
                store,
                grants,
                Arc::new(XenBinder::for_backend_path(&backend)),
                &backend,
                &opts,
                &stop,
                &mut |d| {
                    tracing::info!(status = %d.status(), "serving");
                },
            )
            .map_err(|e| e.to_string())?;
            tracing::info!(?out, "exiting");
            Ok(())
        }
        Cmd::CheckImage { path } => {
            let mut img = xensnap_qcow2::Qcow2::open_file(&path, &xensnap_qcow2::OpenOptions { read_only: true })
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let r = img.check().map_err(|e| format!("{}: {e}", path.display()))?;
            print_out(&serde_json::to_string_pretty(&r).unwrap_or_default());
            if r.is_clean() {
                Ok(())
            } else {
                Err(format!("{}: not clean", path.display()))
            }
        }
        Cmd::Ctl { target, request, socket_dir, timeout_s } => {
            let path = match target.split_once('/') {
                Some((d, n)) if d.parse::<u16>().is_ok() && n.parse::<u32>().is_ok() => {
                    control::socket_path(&socket_dir, d.parse().unwrap(), n.parse().unwrap())
                }
                _ => PathBuf::from(&target),
            };
            let req: serde_json::Value = if request.trim_start().starts_with('{') {
                serde_json::from_str(&request).map_err(|e| format!("request is not JSON: {e}"))?
            } else {
                serde_json::json!({ "op": request })
            };
            let v = control::call(&path, &req, Duration::from_secs(timeout_s))?;
            print_out(&serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }
    }
}
