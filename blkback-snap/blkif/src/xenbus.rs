//! The backend side of the xenbus handshake for one vbd, over a [`XenStore`] trait.
//!
//! ```text
//! Initialising --start()--> InitWait  (features published)
//! InitWait + frontend Initialised|Connected --> read ring-ref(s)/event-channel/protocol,
//!     Connector::connect --> Connected   (sectors/info published again)
//! frontend Closing --> Closing;  frontend Closed --> disconnect --> Closed
//! Closed + frontend Initialising --> InitWait (reconnect, e.g. after the guest restored)
//! toolstack writes our state = Closing (device removal) --> disconnect --> Closed
//! bad frontend values / connect failure --> "<backend>/error" written, state Closing
//! ```
//!
//! Published by [`XenbusBackend::start`] (choices documented on [`Features`]):
//! feature-flush-cache, feature-barrier, feature-discard (+ discard-granularity,
//! discard-alignment = 0, discard-secure), feature-max-indirect-segments (if > 0),
//! max-ring-page-order (if > 0), feature-persistent (= `Features::persistent`, 1 by default:
//! when the frontend sets it too, the ring keeps the frontend's data and indirect pages mapped
//! up to `Features::max_persistent_grants` and unmaps them when it disconnects; otherwise
//! grant copy), sector-size = 512, physical-sector-size = 512, sectors, info. Multi-queue is not
//! offered ("multi-queue-max-queues" absent); a frontend asking for more than one queue is
//! refused.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xensnap_blockdev::BlockDevice;

use crate::abi::*;
use crate::backend::{BlkifRing, Features, Poll, RingParams};
use crate::mem::{EventChannel, GrantMemory};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum XsError {
    #[error("xenstore: {0}")]
    Io(String),
}

/// One watch firing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

/// The subset of xenstore a backend needs (real: libxenstore via libxc-ffi).
pub trait XenStore: Send + Sync {
    fn read(&self, path: &str) -> Result<Option<String>, XsError>;
    fn write(&self, path: &str, value: &str) -> Result<(), XsError>;
    fn remove(&self, path: &str) -> Result<(), XsError>;
    /// Watch `path` and everything below it. Like xenstored, registering fires once at once.
    fn watch(&self, path: &str, token: &str) -> Result<(), XsError>;
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError>;
    /// Next watch event, or `None` after `timeout`.
    fn read_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError>;
}

/// An in-memory xenstore (flat map of paths; watches by path prefix).
#[derive(Default)]
pub struct MemXenStore {
    inner: Mutex<MemInner>,
    cv: Condvar,
}

#[derive(Default)]
struct MemInner {
    nodes: BTreeMap<String, String>,
    watches: Vec<(String, String)>,
    events: VecDeque<WatchEvent>,
}

fn under(path: &str, base: &str) -> bool {
    path == base || (path.starts_with(base) && path.as_bytes().get(base.len()) == Some(&b'/'))
}

impl MemXenStore {
    pub fn new() -> Arc<MemXenStore> {
        Arc::new(MemXenStore::default())
    }
    /// Fire the watches on `path` and above it; for a removal (`removed`) also those below
    /// it, with the watched path as the event's path (what xenstored does for `rm`).
    fn fire(&self, g: &mut MemInner, path: &str, removed: bool) {
        let hits: Vec<_> = g
            .watches
            .iter()
            .filter_map(|(w, t)| {
                if under(path, w) {
                    Some(WatchEvent { path: path.to_string(), token: t.clone() })
                } else if removed && under(w, path) {
                    Some(WatchEvent { path: w.clone(), token: t.clone() })
                } else {
                    None
                }
            })
            .collect();
        if !hits.is_empty() {
            g.events.extend(hits);
            self.cv.notify_all();
        }
    }
    /// All nodes (for debugging tests).
    pub fn dump(&self) -> BTreeMap<String, String> {
        self.inner.lock().unwrap().nodes.clone()
    }
}

impl XenStore for MemXenStore {
    fn read(&self, path: &str) -> Result<Option<String>, XsError> {
        Ok(self.inner.lock().unwrap().nodes.get(path).cloned())
    }
    fn write(&self, path: &str, value: &str) -> Result<(), XsError> {
        let mut g = self.inner.lock().unwrap();
        g.nodes.insert(path.to_string(), value.to_string());
        self.fire(&mut g, path, false);
        Ok(())
    }
    fn remove(&self, path: &str) -> Result<(), XsError> {
        let mut g = self.inner.lock().unwrap();
        g.nodes.retain(|k, _| !under(k, path));
        self.fire(&mut g, path, true);
        Ok(())
    }
    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let mut g = self.inner.lock().unwrap();
        g.watches.push((path.to_string(), token.to_string()));
        g.events.push_back(WatchEvent { path: path.to_string(), token: token.to_string() });
        self.cv.notify_all();
        Ok(())
    }
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let mut g = self.inner.lock().unwrap();
        g.watches.retain(|(p, t)| !(p == path && t == token));
        Ok(())
    }
    fn read_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self.inner.lock().unwrap();
        loop {
            if let Some(e) = g.events.pop_front() {
                return Ok(Some(e));
            }
            match deadline {
                None => g = self.cv.wait(g).unwrap(),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    g = self.cv.wait_timeout(g, d - now).unwrap().0;
                }
            }
        }
    }
}

/// `enum xenbus_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// Parse a state node; absent or garbage reads as `Unknown` (as Linux's xenbus_read_driver_state).
    pub fn parse(s: Option<&str>) -> XenbusState {
        use XenbusState::*;
        match s.and_then(|s| s.trim().parse::<u32>().ok()) {
            Some(1) => Initialising,
            Some(2) => InitWait,
            Some(3) => Initialised,
            Some(4) => Connected,
            Some(5) => Closing,
            Some(6) => Closed,
            Some(7) => Reconfiguring,
            Some(8) => Reconfigured,
            _ => Unknown,
        }
    }
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}

/// What the frontend asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectParams {
    pub frontend_domid: u16,
    pub ring_page_order: u32,
    pub ring_refs: Vec<u32>,
    pub event_channel: u32,
    pub abi: Abi,
    /// The frontend's "feature-persistent" (persistent grants are used if we offer them too).
    pub frontend_persistent: bool,
}

/// Disk properties published to the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    pub sectors: u64,
    /// VDISK_* bits.
    pub info: u32,
}

impl DiskInfo {
    pub fn of(device: &dyn BlockDevice) -> DiskInfo {
        DiskInfo { sectors: device.size() / SECTOR_SIZE, info: if device.read_only() { VDISK_READONLY } else { 0 } }
    }
}

/// Brings rings up and down for the state machine.
pub trait Connector {
    fn connect(&mut self, p: &ConnectParams) -> Result<(), String>;
    /// Idempotent.
    fn disconnect(&mut self);
    fn disk_info(&self) -> DiskInfo;
}

#[derive(Debug, thiserror::Error)]
pub enum XenbusError {
    #[error(transparent)]
    Store(#[from] XsError),
    #[error("backend node {0} missing or invalid")]
    BadBackend(String),
}

/// The xenbus state machine of one vbd backend.
pub struct XenbusBackend {
    store: Arc<dyn XenStore>,
    be: String,
    fe: String,
    fe_domid: u16,
    features: Features,
    state: XenbusState,
    /// The last frontend error reported (also in `<be>/error`).
    last_error: Option<String>,
}

const TOKEN_FE: &str = "xensnap-blkif-fe";
const TOKEN_BE: &str = "xensnap-blkif-be";

impl XenbusBackend {
    /// `backend_path` is e.g. `/local/domain/0/backend/vbd/<domid>/<devid>`; the toolstack has
    /// written `frontend` and `frontend-id` there.
    pub fn new(store: Arc<dyn XenStore>, backend_path: &str, features: Features) -> Result<Self, XenbusError> {
        let be = backend_path.trim_end_matches('/').to_string();
        let fe = store
            .read(&format!("{be}/frontend"))?
            .filter(|s| s.starts_with('/'))
            .ok_or_else(|| XenbusError::BadBackend(format!("{be}/frontend")))?;
        let fe_domid = store
            .read(&format!("{be}/frontend-id"))?
            .and_then(|s| s.trim().parse::<u16>().ok())
            .ok_or_else(|| XenbusError::BadBackend(format!("{be}/frontend-id")))?;
        let mut features = features;
        features.max_ring_page_order = features.max_ring_page_order.min(MAX_RING_PAGE_ORDER);
        features.max_indirect_segments = features.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS_LIMIT);
        Ok(XenbusBackend { store, be, fe, fe_domid, features, state: XenbusState::Initialising, last_error: None })
    }

    pub fn state(&self) -> XenbusState {
        self.state
    }
    pub fn frontend_path(&self) -> &str {
        &self.fe
    }
    pub fn backend_path(&self) -> &str {
        &self.be
    }
    pub fn frontend_domid(&self) -> u16 {
        self.fe_domid
    }
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    fn w(&self, key: &str, v: impl std::fmt::Display) -> Result<(), XsError> {
        self.store.write(&format!("{}/{key}", self.be), &v.to_string())
    }

    fn set_state(&mut self, s: XenbusState) -> Result<(), XsError> {
        self.state = s;
        self.w("state", s.as_u32())
    }

    fn publish_disk(&self, d: &DiskInfo) -> Result<(), XsError> {
        self.w("sector-size", SECTOR_SIZE)?;
        self.w("physical-sector-size", SECTOR_SIZE)?;
        self.w("sectors", d.sectors)?;
        self.w("info", d.info)
    }

    /// Publish features and disk properties, go to InitWait and watch the frontend's state
    /// and our own (device removal by the toolstack).
    pub fn start(&mut self, disk: &DiskInfo) -> Result<(), XenbusError> {
        self.publish(disk)?;
        self.store.watch(&format!("{}/state", self.fe), TOKEN_FE)?;
        self.store.watch(&format!("{}/state", self.be), TOKEN_BE)?;
        Ok(())
    }

    fn publish(&mut self, disk: &DiskInfo) -> Result<(), XenbusError> {
        let f = self.features.clone();
        let b = |x: bool| u32::from(x);
        self.w("feature-flush-cache", b(f.flush))?;
        self.w("feature-barrier", b(f.barrier))?;
        self.w("feature-discard", b(f.discard))?;
        if f.discard {
            self.w("discard-granularity", f.discard_granularity)?;
            self.w("discard-alignment", 0)?;
            self.w("discard-secure", b(f.discard_secure))?;
        }
        if f.max_indirect_segments > 0 {
            self.w("feature-max-indirect-segments", f.max_indirect_segments)?;
        }
        if f.max_ring_page_order > 0 {
            self.w("max-ring-page-order", f.max_ring_page_order)?;
        }
        self.w("feature-persistent", b(f.persistent))?;
        self.publish_disk(disk)?;
        self.store.remove(&format!("{}/error", self.be))?;
        self.set_state(XenbusState::InitWait)?;
        Ok(())
    }

    fn fe_read(&self, key: &str) -> Result<Option<String>, XsError> {
        self.store.read(&format!("{}/{key}", self.fe))
    }

    fn fe_u32(&self, key: &str) -> Result<Option<u32>, String> {
        match self.fe_read(key).map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(s) => s.trim().parse::<u32>().map(Some).map_err(|_| format!("frontend {key} = {s:?} is not a number")),
        }
    }

    /// Read and check the frontend's transport parameters.
    pub fn read_frontend_params(&self) -> Result<ConnectParams, String> {
        let order = self.fe_u32("ring-page-order")?.unwrap_or(0);
        if order > self.features.max_ring_page_order {
            return Err(format!(
                "frontend ring-page-order {order} exceeds max-ring-page-order {}",
                self.features.max_ring_page_order
            ));
        }
        if let Some(q) = self.fe_u32("multi-queue-num-queues")? {
            if q != 1 {
                return Err(format!("frontend asks for {q} queues; multi-queue is not offered"));
            }
        }
        let ring_refs = if order == 0 {
            vec![self.fe_u32("ring-ref")?.ok_or("frontend ring-ref missing")?]
        } else {
            (0..1u32 << order)
                .map(|i| self.fe_u32(&format!("ring-ref{i}"))?.ok_or(format!("frontend ring-ref{i} missing")))
                .collect::<Result<Vec<_>, _>>()?
        };
        let event_channel = self.fe_u32("event-channel")?.ok_or("frontend event-channel missing")?;
        let proto = self.fe_read("protocol").map_err(|e| e.to_string())?;
        let abi = Abi::from_protocol(proto.as_deref())
            .ok_or_else(|| format!("unknown frontend protocol {:?}", proto.unwrap_or_default()))?;
        let frontend_persistent = self.fe_u32("feature-persistent")?.unwrap_or(0) != 0;
        Ok(ConnectParams {
            frontend_domid: self.fe_domid,
            ring_page_order: order,
            ring_refs,
            event_channel,
            abi,
            frontend_persistent,
        })
    }

    fn fail(&mut self, conn: &mut dyn Connector, msg: String) -> Result<(), XenbusError> {
        tracing::warn!(backend = %self.be, "{msg}");
        conn.disconnect();
        self.w("error", &msg)?;
        self.last_error = Some(msg);
        self.set_state(XenbusState::Closing)?;
        Ok(())
    }

    /// React to the frontend's state (call on every watch event for it; spurious calls are
    /// harmless). Returns our state afterwards.
    pub fn frontend_changed(&mut self, conn: &mut dyn Connector) -> Result<XenbusState, XenbusError> {
        use XenbusState::*;
        let fe_state = XenbusState::parse(self.fe_read("state")?.as_deref());
        match fe_state {
            Initialising => {
                if self.state == Closed {
                    // The frontend is starting over (guest reboot of the driver, restore).
                    let d = conn.disk_info();
                    self.publish(&d)?;
                }
            }
            Initialised | Connected => {
                if matches!(self.state, InitWait | Initialising) {
                    match self.read_frontend_params() {
                        Err(msg) => self.fail(conn, msg)?,
                        Ok(p) => {
                            conn.disconnect(); // precondition: no stale ring
                            match conn.connect(&p) {
                                Err(msg) => self.fail(conn, format!("connecting the ring: {msg}"))?,
                                Ok(()) => {
                                    self.publish_disk(&conn.disk_info())?;
                                    self.set_state(Connected)?;
                                }
                            }
                        }
                    }
                }
            }
            Closing => {
                if self.state != Closed {
                    self.set_state(Closing)?;
                }
            }
            Closed | Unknown => {
                conn.disconnect();
                if self.state != Closed && self.state != Initialising {
                    self.set_state(Closed)?;
                }
            }
            InitWait | Reconfiguring | Reconfigured => {}
        }
        Ok(self.state)
    }

    /// React to a change of our own state node: the toolstack removes a device by writing
    /// Closing there. Rings are stopped at once.
    pub fn backend_changed(&mut self, conn: &mut dyn Connector) -> Result<XenbusState, XenbusError> {
        let written = XenbusState::parse(self.store.read(&format!("{}/state", self.be))?.as_deref());
        if written == XenbusState::Closing && self.state != XenbusState::Closing {
            conn.disconnect();
            self.state = XenbusState::Closing;
        }
        if self.state == XenbusState::Closing {
            let fe_state = XenbusState::parse(self.fe_read("state")?.as_deref());
            if matches!(fe_state, XenbusState::Closed | XenbusState::Unknown) {
                conn.disconnect();
                self.set_state(XenbusState::Closed)?;
            }
        }
        Ok(self.state)
    }

    /// Handle one watch event. Returns our state afterwards, or `None` if `timeout` passed
    /// with no event.
    pub fn step(
        &mut self,
        conn: &mut dyn Connector,
        timeout: Option<Duration>,
    ) -> Result<Option<XenbusState>, XenbusError> {
        match self.store.read_watch(timeout)? {
            None => Ok(None),
            Some(ev) if ev.token == TOKEN_FE => self.frontend_changed(conn).map(Some),
            Some(ev) if ev.token == TOKEN_BE => self.backend_changed(conn).map(Some),
            Some(_) => Ok(Some(self.state)),
        }
    }

    /// Remove our watches (the device is gone).
    pub fn unwatch(&self) -> Result<(), XsError> {
        self.store.unwatch(&format!("{}/state", self.fe), TOKEN_FE)?;
        self.store.unwatch(&format!("{}/state", self.be), TOKEN_BE)
    }
}

/// Binds event channels (real: xenevtchn_bind_interdomain).
pub trait EvtchnBinder: Send + Sync {
    fn bind(&self, domid: u16, port: u32) -> Result<Arc<dyn EventChannel>, String>;
}

/// The standard [`Connector`]: maps the ring, binds the event channel and runs a
/// [`BlkifRing`] on its own worker thread.
pub struct RingConnector {
    grants: Arc<dyn GrantMemory>,
    binder: Arc<dyn EvtchnBinder>,
    device: Arc<dyn BlockDevice>,
    features: Features,
    current: Option<(Arc<BlkifRing>, JoinHandle<Poll>)>,
}

impl RingConnector {
    pub fn new(
        grants: Arc<dyn GrantMemory>,
        binder: Arc<dyn EvtchnBinder>,
        device: Arc<dyn BlockDevice>,
        features: Features,
    ) -> Self {
        RingConnector { grants, binder, device, features, current: None }
    }
    /// The live ring (for `quiesce()` / `resume()` by the checkpoint driver).
    pub fn ring(&self) -> Option<Arc<BlkifRing>> {
        self.current.as_ref().map(|(r, _)| Arc::clone(r))
    }
}

impl Connector for RingConnector {
    fn connect(&mut self, p: &ConnectParams) -> Result<(), String> {
        let ring = self.grants.map_ring(p.frontend_domid, &p.ring_refs).map_err(|e| e.to_string())?;
        if ring.len() < p.ring_refs.len() * PAGE_SIZE {
            return Err("ring mapping is short".into());
        }
        let evtchn = self.binder.bind(p.frontend_domid, p.event_channel)?;
        let r = Arc::new(
            BlkifRing::new(RingParams {
                domid: p.frontend_domid,
                abi: p.abi,
                ring,
                grants: Arc::clone(&self.grants),
                evtchn,
                device: Arc::clone(&self.device),
                features: self.features.clone(),
                persistent: p.frontend_persistent && self.features.persistent,
            })
            .map_err(|e| e.to_string())?,
        );
        tracing::info!(domid = p.frontend_domid, persistent = r.persistent(), "ring connected");
        let h = r.spawn(format!("blkif-d{}", p.frontend_domid)).map_err(|e| e.to_string())?;
        self.current = Some((r, h));
        Ok(())
    }

    fn disconnect(&mut self) {
        if let Some((r, h)) = self.current.take() {
            r.stop();
            let _ = h.join();
            // `run` unmapped the persistent grants when it returned; make sure even if it
            // panicked (the frontend may end its grants once we are Closed).
            r.unmap_persistent();
        }
    }

    fn disk_info(&self) -> DiskInfo {
        DiskInfo::of(&*self.device)
    }
}

impl Drop for RingConnector {
    fn drop(&mut self) {
        self.disconnect();
    }
}
