//! Serving one virtual disk: the backend directory libxl wrote, the image its `params`
//! names, the xenbus state machine, the ring worker and the control socket.
//!
//! Generic over blkif's seams, so the same code runs on real Xen (adapters in
//! [`crate::xen`]) and in-process against blkif's sim (tests).
//!
//! Xenstore nodes this backend adds under `<backend>` (besides blkif's protocol nodes):
//! - `xensnap-status`: `ready` once the image is open and the control socket listens, or
//!   `error: <why>` (then `hotplug-error` holds the reason and the hook fails the attach);
//! - `xensnap-socket`: the control socket path; `xensnap-pid`: the serving process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use xensnap_blkif::xenbus::{
    ConnectParams, Connector, DiskInfo, EvtchnBinder, RingConnector, XenStore, XenbusBackend, XenbusState,
};
use xensnap_blkif::{BlkifRing, Features, GrantMemory, StatsSnapshot};

use crate::control::{
    self, ControlServer, Handler, Request, BARRIER_QUIESCE_FAILED, BARRIER_TAKE_FAILED, MAX_DEFER_DURABLE_MS,
};
use crate::durability::Durability;
use crate::image::{parse_params, Format, Image};
use xensnap_control::process_cpu_ns;

/// How to serve a device.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Force an image format (default: by file name, see [`crate::image`]).
    pub format: Option<Format>,
    /// Directory of the control sockets (`blkback-<domid>-<devid>.sock`).
    pub socket_dir: PathBuf,
    /// Also listen on `<image>.xensnap.sock` (what `xl-snap image …` looks for).
    pub image_socket: bool,
    /// How long to wait for the image lock (a previous backend may still be exiting).
    pub lock_wait: Duration,
    pub features: Features,
    /// Watch poll interval (also how quickly removal / stop is noticed).
    pub tick: Duration,
    /// Default `quiesce` timeout.
    pub quiesce_timeout: Duration,
    /// After the toolstack set `online=0` and we reached Closed, exit even if the backend
    /// directory is never removed.
    pub closed_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            format: None,
            socket_dir: PathBuf::from("/run/xensnap"),
            image_socket: true,
            lock_wait: Duration::from_secs(10),
            features: Features::default(),
            tick: Duration::from_millis(250),
            quiesce_timeout: Duration::from_secs(10),
            closed_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("backend {0}: {1}")]
    Backend(String, String),
    #[error("xenstore: {0}")]
    Store(String),
}

/// Why [`serve`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The toolstack removed the backend directory.
    Removed,
    /// Offline and closed for longer than the grace period.
    ClosedOffline,
    /// The caller asked to stop.
    Stopped,
}

/// The parts of a backend directory we use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendNodes {
    pub path: String,
    pub frontend_id: u16,
    pub devid: u32,
    pub params: String,
    pub read_only: bool,
    pub vdev: Option<String>,
}

/// `/local/domain/<be>/backend/vbd/<fe-domid>/<devid>` -> `(fe-domid, devid)`.
pub fn parse_backend_path(p: &str) -> Option<(u16, u32)> {
    let mut it = p.trim_end_matches('/').rsplit('/');
    let devid = it.next()?.parse().ok()?;
    let domid = it.next()?.parse().ok()?;
    Some((domid, devid))
}

pub fn read_backend(store: &dyn XenStore, be: &str) -> Result<BackendNodes, ServeError> {
    let bad = |m: String| ServeError::Backend(be.to_string(), m);
    let rd = |k: &str| store.read(&format!("{be}/{k}")).map_err(|e| ServeError::Store(e.to_string()));
    let (domid, devid) = parse_backend_path(be).ok_or_else(|| bad("path is not .../<domid>/<devid>".into()))?;
    let frontend_id = rd("frontend-id")?
        .and_then(|s| s.trim().parse::<u16>().ok())
        .ok_or_else(|| bad("frontend-id missing".into()))?;
    if frontend_id != domid {
        return Err(bad(format!("frontend-id {frontend_id} does not match the path")));
    }
    let params = rd("params")?.filter(|s| !s.is_empty()).ok_or_else(|| bad("params missing".into()))?;
    let mode = rd("mode")?.unwrap_or_else(|| "w".into());
    Ok(BackendNodes {
        path: be.to_string(),
        frontend_id,
        devid,
        params,
        read_only: !mode.starts_with('w'),
        vdev: rd("dev")?,
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ring state shared between the xenbus loop and the control socket.
#[derive(Default)]
struct RingSlot {
    ring: Option<Arc<BlkifRing>>,
    /// A `quiesce` is in force (applied to any ring connected meanwhile).
    held: bool,
    connects: u64,
    /// Counters of rings already disconnected.
    past: StatsSnapshot,
}

fn add_stats(a: &StatsSnapshot, b: &StatsSnapshot) -> StatsSnapshot {
    StatsSnapshot {
        requests: a.requests + b.requests,
        ok: a.ok + b.ok,
        errors: a.errors + b.errors,
        unsupported: a.unsupported + b.unsupported,
        notifications: a.notifications + b.notifications,
        bytes_read: a.bytes_read + b.bytes_read,
        bytes_written: a.bytes_written + b.bytes_written,
        polls: a.polls + b.polls,
        offloaded: a.offloaded + b.offloaded,
        merged: a.merged + b.merged,
        peak_in_flight: a.peak_in_flight.max(b.peak_in_flight),
        persistent_rings: a.persistent_rings + b.persistent_rings,
        // A gauge: what the newer ring holds mapped (an old ring unmapped everything).
        persistent_grants: b.persistent_grants,
        persistent_hits: a.persistent_hits + b.persistent_hits,
        persistent_misses: a.persistent_misses + b.persistent_misses,
        persistent_fallbacks: a.persistent_fallbacks + b.persistent_fallbacks,
    }
}

fn stats_json(s: &StatsSnapshot) -> Value {
    json!({
        "requests": s.requests, "ok": s.ok, "errors": s.errors, "unsupported": s.unsupported,
        "notifications": s.notifications, "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
        "polls": s.polls, "offloaded": s.offloaded, "merged": s.merged, "peak_in_flight": s.peak_in_flight,
        "persistent_rings": s.persistent_rings, "persistent_grants": s.persistent_grants,
        "persistent_hits": s.persistent_hits, "persistent_misses": s.persistent_misses,
        "persistent_fallbacks": s.persistent_fallbacks,
    })
}

/// One served disk (shared by the xenbus loop and the control socket).
pub struct Device {
    pub nodes: BackendNodes,
    pub image: Image,
    slot: Mutex<RingSlot>,
    state: Mutex<XenbusState>,
    quiesce_timeout: Duration,
    /// The image's background durability worker (every qcow2 image; a read-only one never
    /// has work for it, but a take that got past the engine always finds it).
    durability: Option<Durability>,
}

impl Device {
    fn ring(&self) -> Option<Arc<BlkifRing>> {
        lock(&self.slot).ring.clone()
    }

    /// Quiesce the current ring (if any) and keep new rings quiesced until [`Device::resume`].
    pub fn quiesce(&self, timeout: Duration) -> Result<Value, String> {
        match self.quiesce_ring(timeout) {
            Ok((drained, connected)) => Ok(json!({ "drained": drained, "connected": connected })),
            Err(left) => Err(format!(
                "quiesce timed out after {} ms with {left} request(s) in flight; the ring stays quiesced (send resume)",
                timeout.as_millis()
            )),
        }
    }

    /// Hold the ring and drain it: Ok((drained, connected)) or Err(requests still in flight).
    fn quiesce_ring(&self, timeout: Duration) -> Result<(usize, bool), usize> {
        let ring = {
            let mut s = lock(&self.slot);
            s.held = true;
            s.ring.clone()
        };
        match ring {
            None => Ok((0, false)),
            Some(r) => r.quiesce_timeout(timeout).map(|n| (n, true)),
        }
    }

    /// `checkpoint-barrier`: quiesce, take, resume in one request (see [`Request`]).
    fn checkpoint_barrier(&self, name: &str, timeout: Duration, defer: Option<Duration>) -> Result<Value, String> {
        let q = self.image.qcow2.clone().ok_or("not a qcow2 image (served raw)")?;
        let t0 = Instant::now();
        // for the caller's account of what the disk part costs inside its window
        let cpu0 = process_cpu_ns();
        // A quiesce of the caller stays in force (and is not lifted here).
        let held = self.is_held();
        let (drained, connected) = if held {
            (0, self.ring().is_some())
        } else {
            self.quiesce_ring(timeout).map_err(|left| {
                self.resume();
                format!(
                    "{BARRIER_QUIESCE_FAILED}timed out after {} ms with {left} request(s) in flight; \
                     the ring was resumed, no checkpoint taken",
                    timeout.as_millis()
                )
            })?
        };
        let tq = t0.elapsed();
        let taken = lock(&q).checkpoint_take(name).map_err(qe);
        let tt = t0.elapsed();
        if !held {
            self.resume();
        }
        let info = taken.map_err(|e| format!("{BARRIER_TAKE_FAILED}{e}; the ring was resumed, no checkpoint taken"))?;
        let deferred = match defer {
            Some(max) => self.defer_durability(max),
            None => {
                self.run_durability();
                false
            }
        };
        let mut v = json!(info);
        v["drained"] = json!(drained);
        v["connected"] = json!(connected);
        v["quiesce_micros"] = json!(tq.as_micros() as u64);
        v["take_micros"] = json!((tt - tq).as_micros() as u64);
        v["micros"] = json!(t0.elapsed().as_micros() as u64);
        v["durable_deferred"] = json!(deferred);
        v["cpu_ns"] = json!(cpu0);
        v["pid"] = json!(std::process::id());
        Ok(v)
    }

    /// Hold the background durability work back until `durable-release` or `max` (see
    /// [`Durability::defer`]); false if it was started at once instead (or the image has no
    /// checkpoints: raw).
    fn defer_durability(&self, max: Duration) -> bool {
        self.durability.as_ref().is_some_and(|d| d.defer(max))
    }

    /// Make the pending background work durable now.
    fn run_durability(&self) {
        if let Some(d) = &self.durability {
            d.run_now();
        }
    }

    /// `durable-release`: start the deferred background work (true if some was waiting).
    pub fn durable_release(&self) -> bool {
        self.durability.as_ref().is_some_and(|d| d.release())
    }

    pub fn resume(&self) {
        let ring = {
            let mut s = lock(&self.slot);
            s.held = false;
            s.ring.clone()
        };
        if let Some(r) = ring {
            r.resume();
        }
    }

    pub fn is_held(&self) -> bool {
        lock(&self.slot).held
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = lock(&self.slot);
        let cur = s.ring.as_ref().map(|r| r.stats()).unwrap_or_default();
        add_stats(&s.past, &cur)
    }

    pub fn state(&self) -> XenbusState {
        *lock(&self.state)
    }

    pub fn status(&self) -> Value {
        let (connected, quiesced, broken, connects, held) = {
            let s = lock(&self.slot);
            match &s.ring {
                Some(r) => (true, r.is_quiesced(), r.broken(), s.connects, s.held),
                None => (false, false, None, s.connects, s.held),
            }
        };
        let st = self.state();
        json!({
            "backend": self.nodes.path,
            "frontend_id": self.nodes.frontend_id,
            "devid": self.nodes.devid,
            "vdev": self.nodes.vdev,
            "image": self.image.path.display().to_string(),
            "format": self.image.format.as_str(),
            "size": self.image.device.size(),
            "read_only": self.image.device.read_only(),
            "state": st.as_u32(),
            "state_name": format!("{st:?}"),
            "connected": connected,
            "connects": connects,
            "quiesced": quiesced || held,
            "broken": broken,
            "pid": std::process::id(),
            "stats": stats_json(&self.stats()),
            // background checkpoint work not durable yet (qcow2; null for raw)
            "durable_pending": self.image.qcow2.as_ref().map(|q| lock(q).durable_pending()),
            // what a checkpoint driver may use beyond the basic ops
            "ops": if self.image.qcow2.is_some() {
                json!(["checkpoint-barrier", "durable-hold", "durable-release"])
            } else {
                json!([])
            },
        })
    }

    fn qcow2(&self) -> Result<MutexGuard<'_, xensnap_qcow2::Qcow2>, String> {
        let q = self.image.qcow2.as_ref().ok_or("not a qcow2 image (served raw)")?;
        Ok(lock(q))
    }

    /// Run `f` with the ring quiesced: quiesce now unless the caller already holds a quiesce.
    fn with_quiesced<T>(&self, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        if self.is_held() {
            return f();
        }
        self.quiesce(self.quiesce_timeout).inspect_err(|_| self.resume())?;
        let r = f();
        self.resume();
        r
    }

    fn require_quiet(&self, what: &str) -> Result<(), String> {
        if self.ring().is_some() && !self.is_held() {
            return Err(format!("{what} needs the disk quiesced (send quiesce first) or the guest disconnected"));
        }
        Ok(())
    }
}

fn qe(e: xensnap_qcow2::Error) -> String {
    e.to_string()
}

impl Handler<Request> for Device {
    fn handle(&self, req: &Request) -> Result<Value, String> {
        match req {
            Request::Status => Ok(self.status()),
            Request::Stats => Ok(stats_json(&self.stats())),
            Request::Quiesce { timeout_ms } => {
                let t = timeout_ms.map(Duration::from_millis).unwrap_or(self.quiesce_timeout);
                let t0 = Instant::now();
                let mut v = self.quiesce(t)?;
                v["micros"] = json!(t0.elapsed().as_micros() as u64);
                Ok(v)
            }
            Request::Resume => {
                self.resume();
                Ok(json!({ "resumed": true }))
            }
            Request::Flush => {
                self.image.device.flush().map_err(|e| e.to_string())?;
                Ok(json!({ "flushed": true }))
            }
            Request::Info => Ok(json!(self.qcow2()?.info())),
            Request::Check { repair } => {
                if *repair {
                    self.require_quiet("check with repair")?;
                    Ok(json!(self.qcow2()?.repair().map_err(qe)?))
                } else {
                    Ok(json!(self.qcow2()?.check().map_err(qe)?))
                }
            }
            Request::CheckpointCreate { name } => {
                if self.image.qcow2.is_none() {
                    return Err("not a qcow2 image (served raw)".into());
                }
                let t0 = Instant::now();
                let info = self.with_quiesced(|| self.qcow2()?.checkpoint_create(name).map_err(qe))?;
                let mut v = json!(info);
                v["micros"] = json!(t0.elapsed().as_micros() as u64);
                Ok(v)
            }
            Request::CheckpointTake { name } => {
                let q = self.image.qcow2.clone().ok_or("not a qcow2 image (served raw)")?;
                let t0 = Instant::now();
                let info = self.with_quiesced(|| lock(&q).checkpoint_take(name).map_err(qe))?;
                let micros = t0.elapsed().as_micros() as u64;
                self.run_durability();
                let mut v = json!(info);
                v["micros"] = json!(micros);
                Ok(v)
            }
            Request::CheckpointBarrier { name, timeout_ms, defer_durable_ms } => self.checkpoint_barrier(
                name,
                timeout_ms.map(Duration::from_millis).unwrap_or(self.quiesce_timeout),
                defer_durable_ms.map(|ms| Duration::from_millis(ms.min(MAX_DEFER_DURABLE_MS))),
            ),
            Request::DurableHold { max_ms } => {
                let cpu = process_cpu_ns();
                let held = self.defer_durability(Duration::from_millis((*max_ms).min(MAX_DEFER_DURABLE_MS)));
                Ok(json!({ "held": held, "cpu_ns": cpu, "pid": std::process::id() }))
            }
            Request::DurableRelease => {
                let cpu = process_cpu_ns();
                Ok(json!({ "released": self.durable_release(), "cpu_ns": cpu, "pid": std::process::id() }))
            }
            Request::CheckpointList => Ok(json!(self.qcow2()?.checkpoint_list())),
            Request::CheckpointDelete { checkpoint } => {
                self.qcow2()?.checkpoint_delete(checkpoint).map_err(qe)?;
                Ok(json!({ "deleted": checkpoint }))
            }
            Request::CheckpointRevert { checkpoint } => {
                self.require_quiet("checkpoint-revert")?;
                self.qcow2()?.checkpoint_revert(checkpoint).map_err(qe)?;
                Ok(json!({ "reverted": checkpoint }))
            }
            Request::Map { checkpoint } => Ok(json!(self.qcow2()?.map(checkpoint.as_deref()).map_err(qe)?)),
        }
    }
}

/// blkif's [`RingConnector`], publishing the live ring to the [`Device`] (for the control
/// socket) and applying a held quiesce to a ring that connects meanwhile.
struct SlotConnector {
    inner: RingConnector,
    dev: Arc<Device>,
}

impl Connector for SlotConnector {
    fn connect(&mut self, p: &ConnectParams) -> Result<(), String> {
        self.inner.connect(p)?;
        let ring = self.inner.ring().expect("connected");
        let mut s = lock(&self.dev.slot);
        if s.held {
            // The worker may already have admitted a request; quiesce() waits for it.
            ring.quiesce();
        }
        tracing::info!(
            frontend = p.frontend_domid,
            order = p.ring_page_order,
            abi = ?p.abi,
            port = p.event_channel,
            io_threads = ring.features().workers,
            persistent_grants = ring.persistent(),
            "ring connected"
        );
        s.ring = Some(ring);
        s.connects += 1;
        Ok(())
    }

    fn disconnect(&mut self) {
        let old = lock(&self.dev.slot).ring.take();
        // Stops the ring's threads and unmaps its persistent grants.
        self.inner.disconnect();
        if let Some(r) = old {
            let st = r.stats();
            tracing::info!(stats = ?st, "ring disconnected");
            let mut s = lock(&self.dev.slot);
            s.past = add_stats(&s.past, &st);
        }
    }

    fn disk_info(&self) -> DiskInfo {
        self.inner.disk_info()
    }
}

/// Report a fatal setup error where libxl and the hook look: `hotplug-error`,
/// `xensnap-status`, and state InitWait so that libxl runs the hook, which fails the attach
/// with this message (instead of a bare 10 s "unable to initialize device" timeout).
fn report_setup_error(store: &dyn XenStore, be: &str, msg: &str) {
    let _ = store.write(&format!("{be}/hotplug-error"), msg);
    let _ = store.write(&format!("{be}/xensnap-status"), &format!("error: {msg}"));
    let _ = store.write(&format!("{be}/state"), "2");
}

/// Serve the device at `be` until the toolstack removes it (or `stop` is set).
pub fn serve(
    store: Arc<dyn XenStore>,
    grants: Arc<dyn GrantMemory>,
    binder: Arc<dyn EvtchnBinder>,
    be: &str,
    opts: &ServeOptions,
    stop: &AtomicBool,
    on_ready: &mut dyn FnMut(&Arc<Device>),
) -> Result<Outcome, ServeError> {
    let be = be.trim_end_matches('/').to_string();
    let nodes = match read_backend(&*store, &be) {
        Ok(n) => n,
        Err(e) => {
            report_setup_error(&*store, &be, &e.to_string());
            return Err(e);
        }
    };
    let (fmt, path) = parse_params(&nodes.params);
    let image = match Image::open(&path, opts.format.or(fmt), nodes.read_only, opts.lock_wait) {
        Ok(i) => i,
        Err(e) => {
            let msg = format!("blkback-snap: {e}");
            report_setup_error(&*store, &be, &msg);
            wait_removed(&*store, &be, opts, stop);
            return Err(ServeError::Backend(be, e.to_string()));
        }
    };
    tracing::info!(backend = %be, image = %path.display(), format = image.format.as_str(),
        size = image.device.size(), read_only = nodes.read_only, "image open");
    let durability = image.qcow2.as_ref().map(|q| Durability::start(Arc::clone(q)));
    let dev = Arc::new(Device {
        nodes: nodes.clone(),
        image,
        slot: Mutex::new(RingSlot::default()),
        state: Mutex::new(XenbusState::Initialising),
        quiesce_timeout: opts.quiesce_timeout,
        durability,
    });

    // Control sockets before we announce anything.
    let sock = control::socket_path(&opts.socket_dir, nodes.frontend_id, nodes.devid);
    let handler: Arc<dyn Handler<Request>> = dev.clone();
    let mut servers = Vec::new();
    match ControlServer::bind(&sock, Arc::clone(&handler)) {
        Ok(s) => servers.push(s),
        Err(e) => {
            let msg = format!("blkback-snap: control socket {}: {e}", sock.display());
            report_setup_error(&*store, &be, &msg);
            wait_removed(&*store, &be, opts, stop);
            return Err(ServeError::Backend(be, msg));
        }
    }
    if opts.image_socket {
        let alias = control::image_socket_path(&dev.image.path);
        match ControlServer::bind(&alias, handler) {
            Ok(s) => servers.push(s),
            Err(e) => tracing::warn!("image control socket {}: {e} (continuing without it)", alias.display()),
        }
    }

    let w = |k: &str, v: &str| store.write(&format!("{be}/{k}"), v).map_err(|e| ServeError::Store(e.to_string()));
    w("xensnap-socket", &sock.display().to_string())?;
    w("xensnap-pid", &std::process::id().to_string())?;
    w("xensnap-format", dev.image.format.as_str())?;
    let _ = store.remove(&format!("{be}/hotplug-error"));
    w("xensnap-status", "ready")?;

    let mut conn = SlotConnector {
        inner: RingConnector::new(grants, binder, Arc::clone(&dev.image.device), opts.features.clone()),
        dev: Arc::clone(&dev),
    };
    let se = |e: xensnap_blkif::xenbus::XenbusError| ServeError::Backend(be.clone(), e.to_string());
    let mut xb = match XenbusBackend::new(Arc::clone(&store), &be, opts.features.clone()) {
        Ok(x) => x,
        Err(e) => {
            let msg = format!("blkback-snap: {e}");
            report_setup_error(&*store, &be, &msg);
            wait_removed(&*store, &be, opts, stop);
            return Err(ServeError::Backend(be.clone(), msg));
        }
    };
    xb.start(&conn.disk_info()).map_err(se)?;
    *lock(&dev.state) = xb.state();
    on_ready(&dev);

    let mut closed_since: Option<Instant> = None;
    // Quiet ticks since the last look at our nodes. A removal fires our watch on {be}/state
    // (xenstored fires the watches below a removed directory), so between watch events the
    // nodes are read only every LOOK_EVERY ticks (a safety net) and on every tick while
    // Closed (the grace timer): two xenstore round trips per tick were the daemon's main
    // idle cost, also inside a checkpoint's suspended window.
    const LOOK_EVERY: u32 = 20;
    let mut quiet = 0u32;
    let outcome = loop {
        if stop.load(Ordering::Relaxed) {
            break Outcome::Stopped;
        }
        let event = match xb.step(&mut conn, Some(opts.tick)) {
            Ok(ev) => ev.is_some(),
            Err(e) => {
                tracing::warn!("xenbus step: {e}");
                std::thread::sleep(opts.tick);
                true
            }
        };
        let st = xb.state();
        *lock(&dev.state) = st;
        quiet = if event { 0 } else { quiet + 1 };
        if st != XenbusState::Closed && quiet > 0 && !quiet.is_multiple_of(LOOK_EVERY) {
            continue;
        }
        // Removal: libxl deletes the whole backend directory after the hook's "remove".
        match store.read(&format!("{be}/state")) {
            Ok(None) => break Outcome::Removed,
            Ok(Some(_)) => {}
            Err(e) => tracing::warn!("reading our state: {e}"),
        }
        let online = store.read(&format!("{be}/online")).ok().flatten();
        if st == XenbusState::Closed && online.as_deref() == Some("0") {
            let t = *closed_since.get_or_insert_with(Instant::now);
            if t.elapsed() >= opts.closed_grace {
                break Outcome::ClosedOffline;
            }
        } else {
            closed_since = None;
        }
    };
    conn.disconnect();
    let _ = xb.unwatch();
    // Checkpoints taken but not yet durable are finished before the process lets go.
    if let Some(q) = &dev.image.qcow2 {
        if let Err(e) = lock(q).wait_durable() {
            tracing::error!("finishing background checkpoint work: {e}");
        }
    }
    if let Err(e) = dev.image.device.flush() {
        tracing::warn!("final flush: {e}");
    }
    drop(servers);
    tracing::info!(backend = %be, ?outcome, stats = ?dev.stats(), "device done");
    Ok(outcome)
}

/// After a setup failure: answer the toolstack's Closing with Closed and wait until the
/// backend directory is gone (or stop / grace).
fn wait_removed(store: &dyn XenStore, be: &str, opts: &ServeOptions, stop: &AtomicBool) {
    let t0 = Instant::now();
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < opts.closed_grace {
        match store.read(&format!("{be}/state")) {
            Ok(None) => return,
            Ok(Some(s)) if s.trim() == "5" => {
                let _ = store.write(&format!("{be}/state"), "6");
            }
            _ => {}
        }
        let _ = store.read_watch(Some(opts.tick));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Format;
    use xensnap_blkif::xenbus::MemXenStore;
    use xensnap_qcow2::{CheckpointState, CreateOptions, Qcow2};

    /// A device serving a fresh qcow2 (or raw) image, no ring connected.
    fn device(dir: &std::path::Path, format: Format) -> Device {
        let path = dir.join("d.img");
        match format {
            Format::Qcow2 => {
                let opts = CreateOptions { size: 64 << 20, cluster_bits: 16, refcount_order: 4 };
                Qcow2::create_file(&path, &opts).unwrap().close().unwrap();
            }
            Format::Raw => std::fs::write(&path, vec![0u8; 1 << 20]).unwrap(),
        }
        let image = Image::open(&path, Some(format), false, Duration::from_secs(1)).unwrap();
        let durability = image.qcow2.as_ref().map(|q| Durability::start(Arc::clone(q)));
        Device {
            nodes: BackendNodes {
                path: "/local/domain/0/backend/vbd/3/51712".into(),
                frontend_id: 3,
                devid: 51712,
                params: path.display().to_string(),
                read_only: false,
                vdev: Some("xvda".into()),
            },
            image,
            slot: Mutex::new(RingSlot::default()),
            state: Mutex::new(XenbusState::Connected),
            quiesce_timeout: Duration::from_secs(5),
            durability,
        }
    }

    fn barrier(name: &str, defer_ms: Option<u64>) -> Request {
        Request::CheckpointBarrier { name: name.into(), timeout_ms: Some(1000), defer_durable_ms: defer_ms }
    }

    fn state_of(d: &Device, name: &str) -> CheckpointState {
        let l = d.qcow2().unwrap().checkpoint_list();
        l.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("{name} not listed")).state
    }

    fn wait_durable(d: &Device, name: &str) {
        let t = Instant::now();
        while state_of(d, name) != CheckpointState::Durable {
            assert!(t.elapsed() < Duration::from_secs(10), "{name} never durable");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Until no background work is pending and the driver thread had time to see it.
    fn wait_idle(d: &Device) {
        let t = Instant::now();
        while d.qcow2().unwrap().durable_pending() {
            assert!(t.elapsed() < Duration::from_secs(10), "background work never finished");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    #[test]
    fn checkpoint_barrier_takes_and_resumes_in_one_request() {
        let dir = tempfile::tempdir().unwrap();
        let d = device(dir.path(), Format::Qcow2);
        let v = d.handle(&barrier("b1", None)).unwrap();
        assert_eq!(v["name"], "b1");
        assert_eq!(v["durable_deferred"], false);
        assert_eq!((v["drained"].as_u64(), v["connected"].as_bool()), (Some(0), Some(false)));
        assert!(v["micros"].as_u64().is_some() && v["take_micros"].as_u64().is_some());
        assert!(v["cpu_ns"].as_u64().is_some_and(|n| n > 0), "{v}");
        assert!(!d.is_held(), "the barrier lifts its own quiesce");
        assert_eq!(d.status()["ops"], json!(["checkpoint-barrier", "durable-hold", "durable-release"]));
        // not deferred: durable without a release
        wait_durable(&d, "b1");
    }

    #[test]
    fn checkpoint_barrier_keeps_the_callers_quiesce() {
        let dir = tempfile::tempdir().unwrap();
        let d = device(dir.path(), Format::Qcow2);
        d.handle(&Request::Quiesce { timeout_ms: None }).unwrap();
        d.handle(&barrier("b1", None)).unwrap();
        assert!(d.is_held());
        d.handle(&Request::Resume).unwrap();
        assert!(!d.is_held());
    }

    #[test]
    fn failed_barrier_names_the_step_resumes_and_leaves_no_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let d = device(dir.path(), Format::Qcow2);
        d.handle(&barrier("b1", Some(60_000))).unwrap();
        let e = d.handle(&barrier("b1", Some(60_000))).unwrap_err();
        assert!(e.starts_with(BARRIER_TAKE_FAILED), "{e}");
        assert!(e.contains("already exists"), "{e}");
        assert!(!d.is_held());
        assert_eq!(d.qcow2().unwrap().checkpoint_list().len(), 1);
        // a raw image has no checkpoints (and nothing was quiesced)
        let dir2 = tempfile::tempdir().unwrap();
        let r = device(dir2.path(), Format::Raw);
        assert!(r.handle(&barrier("x", None)).unwrap_err().contains("not a qcow2"));
        assert_eq!(r.status()["ops"], json!([]));
        assert!(!r.is_held());
    }

    #[test]
    fn deferred_durability_waits_for_the_release() {
        let dir = tempfile::tempdir().unwrap();
        let d = device(dir.path(), Format::Qcow2);
        let v = d.handle(&barrier("b1", Some(60_000))).unwrap();
        assert_eq!(v["durable_deferred"], true);
        // a second deferred take joins the same wait
        d.handle(&barrier("b2", Some(60_000))).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(state_of(&d, "b1"), CheckpointState::Taken);
        assert_eq!(state_of(&d, "b2"), CheckpointState::Taken);
        assert!(d.qcow2().unwrap().durable_pending());
        // readable meanwhile; deleting a taken checkpoint works too
        d.handle(&Request::CheckpointDelete { checkpoint: "b2".into() }).unwrap();
        assert_eq!(d.handle(&Request::DurableRelease).unwrap()["released"], true);
        wait_durable(&d, "b1");
        assert_eq!(d.qcow2().unwrap().checkpoint_list().len(), 1);
        // nothing left to release
        assert_eq!(d.handle(&Request::DurableRelease).unwrap()["released"], false);
        // a later deferral waits again (a driver still running would stop at the hold)
        wait_idle(&d);
        d.handle(&barrier("b3", Some(60_000))).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(state_of(&d, "b3"), CheckpointState::Taken);
        assert_eq!(d.handle(&Request::DurableRelease).unwrap()["released"], true);
        wait_durable(&d, "b3");
    }

    #[test]
    fn durable_hold_holds_all_work_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let d = device(dir.path(), Format::Qcow2);
        assert_eq!(d.status()["durable_pending"], false);
        let v = d.handle(&Request::DurableHold { max_ms: 60_000 }).unwrap();
        assert_eq!(v["held"], true);
        assert!(v["cpu_ns"].as_u64().is_some() && v["pid"].as_u64().is_some(), "{v}");
        // a take that would start its work at once waits as well; the barrier joins the hold
        d.handle(&Request::CheckpointTake { name: "t1".into() }).unwrap();
        let b = d.handle(&barrier("b1", Some(60_000))).unwrap();
        assert_eq!(b["durable_deferred"], true);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(state_of(&d, "t1"), CheckpointState::Taken);
        assert_eq!(state_of(&d, "b1"), CheckpointState::Taken);
        assert_eq!(d.status()["durable_pending"], true);
        assert_eq!(d.handle(&Request::DurableRelease).unwrap()["released"], true);
        wait_durable(&d, "t1");
        wait_durable(&d, "b1");
        wait_idle(&d);
        assert_eq!(d.status()["durable_pending"], false);
        // a raw image has no background work to hold
        let dir2 = tempfile::tempdir().unwrap();
        let r = device(dir2.path(), Format::Raw);
        assert_eq!(r.handle(&Request::DurableHold { max_ms: 1000 }).unwrap()["held"], false);
        assert_eq!(r.status()["durable_pending"], Value::Null);
    }

    /// Threads of this process (nextest runs every test in a process of its own).
    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").unwrap().count()
    }

    #[test]
    fn deferred_barrier_starts_no_thread_and_release_reports_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let d = device(dir.path(), Format::Qcow2);
        // the worker started with the device, and is idle
        std::thread::sleep(Duration::from_millis(50));
        let before = threads();
        let v = d.handle(&barrier("b1", Some(60_000))).unwrap();
        assert_eq!(v["durable_deferred"], true);
        assert_eq!(threads(), before, "a thread was started inside the window");
        let r = d.handle(&Request::DurableRelease).unwrap();
        assert_eq!(r["released"], true);
        assert!(r["cpu_ns"].as_u64().unwrap() >= v["cpu_ns"].as_u64().unwrap(), "{v} {r}");
        wait_durable(&d, "b1");
        assert_eq!(threads(), before, "the worker made it durable");
    }

    #[test]
    fn deferred_durability_starts_by_itself_after_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let d = device(dir.path(), Format::Qcow2);
        let t = Instant::now();
        d.handle(&barrier("b1", Some(150))).unwrap();
        wait_durable(&d, "b1");
        assert!(t.elapsed() >= Duration::from_millis(150), "{:?}", t.elapsed());
        // the timed-out gate is not reused: the next deferral waits (and is released)
        assert_eq!(d.handle(&Request::DurableRelease).unwrap()["released"], false);
        wait_idle(&d);
        d.handle(&barrier("b2", Some(60_000))).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(state_of(&d, "b2"), CheckpointState::Taken);
        assert!(d.durable_release());
        wait_durable(&d, "b2");
    }

    #[test]
    fn backend_paths() {
        assert_eq!(parse_backend_path("/local/domain/0/backend/vbd/3/51712"), Some((3, 51712)));
        assert_eq!(parse_backend_path("/local/domain/0/backend/vbd/3/51712/"), Some((3, 51712)));
        assert_eq!(parse_backend_path("/local/domain/0/backend/vbd/x/51712"), None);
        assert_eq!(parse_backend_path("51712"), None);
    }

    #[test]
    fn backend_nodes() {
        let xs = MemXenStore::new();
        let be = "/local/domain/0/backend/vbd/3/51712";
        let w = |k: &str, v: &str| xs.write(&format!("{be}/{k}"), v).unwrap();
        assert!(read_backend(&*xs, be).is_err());
        w("frontend-id", "3");
        assert!(read_backend(&*xs, be).unwrap_err().to_string().contains("params"));
        w("params", "/img/g.qcow2");
        w("dev", "xvda");
        let n = read_backend(&*xs, be).unwrap();
        assert_eq!((n.frontend_id, n.devid, n.read_only), (3, 51712, false));
        assert_eq!(n.vdev.as_deref(), Some("xvda"));
        w("mode", "r");
        assert!(read_backend(&*xs, be).unwrap().read_only);
        w("frontend-id", "4");
        assert!(read_backend(&*xs, be).unwrap_err().to_string().contains("does not match"));
    }
}
