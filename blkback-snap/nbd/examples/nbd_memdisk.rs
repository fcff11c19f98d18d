//! Serve a MemDisk over NBD until killed, e.g. to measure protocol overhead:
//!
//! ```text
//! cargo run --release -p xensnap-nbd --example nbd_memdisk -- 127.0.0.1:10809 1G [name] [--ro]
//! qemu-img bench -f raw -t none -c 100000 nbd://127.0.0.1:10809/name
//! ```
//! Address `unix:/path/sock` serves on a Unix socket instead. Size takes K/M/G suffixes.
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`).

use std::sync::Arc;

use xensnap_blockdev::MemDisk;
use xensnap_nbd::{Server, StaticExports};

fn parse_size(s: &str) -> Option<usize> {
    let (num, mul) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1usize << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mul)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let args: Vec<String> = std::env::args().skip(1).collect();
    let ro = args.iter().any(|a| a == "--ro");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    if pos.len() < 2 {
        eprintln!("usage: nbd_memdisk ADDR|unix:PATH SIZE [NAME] [--ro]");
        std::process::exit(2);
    }
    let size = parse_size(pos[1]).ok_or("bad size")?;
    let name = pos.get(2).map(|s| s.as_str()).unwrap_or("");
    let disk = MemDisk::from_vec(vec![0; size], ro);
    let server = Server::new(Arc::new(StaticExports::single(name, Arc::new(disk))));
    if let Some(path) = pos[0].strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path)?;
        eprintln!("serving {size} bytes as {name:?} on unix:{path}");
        server.serve_unix(l)?;
    } else {
        let l = std::net::TcpListener::bind(pos[0].as_str())?;
        eprintln!("serving {size} bytes as {name:?} on {}", l.local_addr()?);
        server.serve_tcp(l)?;
    }
    Ok(())
}
