//! The dom0 service: watch `backend/vbd` of this domain and start one `blkback-snap serve`
//! process per new device that is ours.
//!
//! Why a watcher at all: for a `phy` disk libxl waits (10 s) for the backend to reach
//! InitWait *before* it runs the disk's hotplug script, so the backend must already be
//! running when libxl writes the device; the hook script can only confirm (see
//! `hooks/xensnap`). A device is ours when its `script` node names our hook
//! (`script=xensnap` in the disk spec; libxl stores `/etc/xen/scripts/xensnap`).
//!
//! One process per disk (like QEMU's qdisk or tapdisk): a crash or a hung image affects
//! one guest disk only, and each process owns exactly one image lock and control socket.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Does the backend's `script` node name our hook?
pub fn is_ours(script: Option<&str>, script_name: &str) -> bool {
    match script {
        Some(s) => Path::new(s.trim()).file_name().and_then(|f| f.to_str()) == Some(script_name),
        None => false,
    }
}

/// What the watcher needs from xenstore (real: libxc-ffi; tests: a fake).
pub trait Store {
    fn read(&self, path: &str) -> Option<String>;
    fn directory(&self, path: &str) -> Vec<String>;
}

/// Devices under `base` (= `.../backend/vbd`) that are ours and still Initialising (1):
/// the candidates for a new serving process.
pub fn new_devices(store: &dyn Store, base: &str, script_name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for fe in store.directory(base) {
        if fe.parse::<u16>().is_err() {
            continue;
        }
        for dev in store.directory(&format!("{base}/{fe}")) {
            if dev.parse::<u32>().is_err() {
                continue;
            }
            let be = format!("{base}/{fe}/{dev}");
            if !is_ours(store.read(&format!("{be}/script")).as_deref(), script_name) {
                continue;
            }
            if store.read(&format!("{be}/state")).as_deref().map(str::trim) == Some("1") {
                out.push(be);
            }
        }
    }
    out
}

pub struct WatchOptions {
    pub script_name: String,
    pub log_dir: PathBuf,
    /// Extra arguments for every `serve` child.
    pub serve_args: Vec<String>,
}

struct Xs(libxc_ffi::XenStore);

impl Store for Xs {
    fn read(&self, path: &str) -> Option<String> {
        self.0.read_opt(path).ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned())
    }
    fn directory(&self, path: &str) -> Vec<String> {
        self.0.directory(path).unwrap_or_default()
    }
}

/// Run the watcher forever (real Xen).
pub fn run(opts: &WatchOptions) -> Result<(), String> {
    let xs = Xs(libxc_ffi::XenStore::open().map_err(|e| e.to_string())?);
    let me = xs.read("domid").unwrap_or_else(|| "0".into());
    let base = format!("/local/domain/{}/backend/vbd", me.trim());
    xs.0.watch(&base, "xensnap-vbd").map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&opts.log_dir).map_err(|e| format!("{}: {e}", opts.log_dir.display()))?;
    tracing::info!(%base, script = %opts.script_name, "watching for devices");
    let mut children: HashMap<String, Child> = HashMap::new();
    loop {
        match xs.0.wait_watch(Some(Duration::from_secs(2))) {
            Ok(_) => while let Ok(Some(_)) = xs.0.check_watch() {},
            Err(e) => {
                tracing::warn!("watch: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        // Reap finished children.
        children.retain(|be, c| match c.try_wait() {
            Ok(Some(st)) => {
                tracing::info!(backend = %be, status = %st, "serving process exited");
                false
            }
            _ => true,
        });
        for be in new_devices(&xs, &base, &opts.script_name) {
            if children.contains_key(&be) {
                continue;
            }
            let Some((domid, devid)) = crate::device::parse_backend_path(&be) else {
                continue;
            };
            let log = opts.log_dir.join(format!("xensnap-blkback-{domid}-{devid}.log"));
            let out = std::fs::OpenOptions::new().create(true).append(true).open(&log);
            let (o, e) = match out.and_then(|f| Ok((f.try_clone()?, f))) {
                Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
                Err(_) => (Stdio::null(), Stdio::null()),
            };
            let mut cmd = Command::new(&exe);
            cmd.arg("serve").arg("--backend").arg(&be).args(&opts.serve_args).stdin(Stdio::null()).stdout(o).stderr(e);
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            match cmd.spawn() {
                Ok(c) => {
                    tracing::info!(backend = %be, pid = c.id(), log = %log.display(), "serving process started");
                    children.insert(be, c);
                }
                Err(e) => tracing::error!(backend = %be, "cannot start serving process: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Fake(BTreeMap<String, String>);
    impl Store for Fake {
        fn read(&self, path: &str) -> Option<String> {
            self.0.get(path).cloned()
        }
        fn directory(&self, path: &str) -> Vec<String> {
            let pfx = format!("{path}/");
            let mut v: Vec<String> = self
                .0
                .keys()
                .filter_map(|k| k.strip_prefix(&pfx))
                .map(|r| r.split('/').next().unwrap().to_string())
                .collect();
            v.dedup();
            v
        }
    }

    #[test]
    fn ours_by_script_basename() {
        assert!(is_ours(Some("/etc/xen/scripts/xensnap"), "xensnap"));
        assert!(is_ours(Some("xensnap"), "xensnap"));
        assert!(!is_ours(Some("/etc/xen/scripts/block"), "xensnap"));
        assert!(!is_ours(Some("/etc/xen/scripts/xensnap-other"), "xensnap"));
        assert!(!is_ours(None, "xensnap"));
    }

    #[test]
    fn picks_new_devices_that_are_ours() {
        let b = "/local/domain/0/backend/vbd";
        let mut m = BTreeMap::new();
        let mut dev = |fe: &str, id: &str, script: &str, state: &str| {
            m.insert(format!("{b}/{fe}/{id}/script"), script.to_string());
            m.insert(format!("{b}/{fe}/{id}/state"), state.to_string());
        };
        dev("3", "51712", "/etc/xen/scripts/xensnap", "1");
        dev("3", "51728", "/etc/xen/scripts/block", "1");
        dev("4", "51712", "/etc/xen/scripts/xensnap", "4");
        dev("5", "51712", "/etc/xen/scripts/xensnap", "1");
        dev("junk", "1", "/etc/xen/scripts/xensnap", "1");
        let f = Fake(m);
        assert_eq!(new_devices(&f, b, "xensnap"), vec![format!("{b}/3/51712"), format!("{b}/5/51712")]);
        assert!(new_devices(&f, "/nothing", "xensnap").is_empty());
    }
}
