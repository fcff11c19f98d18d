//! Which exports a server offers.

use std::collections::BTreeMap;
use std::sync::Arc;

use xensnap_blockdev::BlockDevice;

/// The set of exports a [`crate::Server`] serves. Looked up on every connection, so an
/// implementation can add and remove exports (e.g. checkpoints) while the server runs.
pub trait ExportRegistry: Send + Sync + 'static {
    /// Resolve an export name (`""` = default export) to a device; `None` =>
    /// `NBD_REP_ERR_UNKNOWN` (or a dropped connection for `NBD_OPT_EXPORT_NAME`).
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockDevice>>;

    /// Names for `NBD_OPT_LIST`, each with a (possibly empty) human-readable description.
    fn list(&self) -> Vec<(String, String)>;

    /// Whether `NBD_FLAG_CAN_MULTI_CONN` may be advertised for this export: true only if
    /// every connection to `name` reaches the same device state, so that a flush on one
    /// connection covers writes completed on any other. The default allows it for read-only
    /// devices only; override it when `lookup` returns a shared device whose `flush` is
    /// global (as the `BlockDevice` contract asks).
    fn can_multi_conn(&self, _name: &str, device: &dyn BlockDevice) -> bool {
        device.read_only()
    }

    /// Description for `NBD_INFO_DESCRIPTION`; the default takes it from [`Self::list`].
    fn description(&self, name: &str) -> Option<String> {
        self.list().into_iter().find(|(n, _)| n == name).map(|(_, d)| d).filter(|d| !d.is_empty())
    }
}

/// A fixed set of exports: name -> (device, description). Every connection to a name gets
/// the same `Arc`, so `NBD_FLAG_CAN_MULTI_CONN` is advertised for all of them.
#[derive(Default, Clone)]
pub struct StaticExports(BTreeMap<String, (Arc<dyn BlockDevice>, String)>);

impl StaticExports {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builder form of [`StaticExports::insert`] with an empty description.
    pub fn with(mut self, name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        self.insert(name, device, "");
        self
    }

    /// Add (or replace) an export.
    pub fn insert(&mut self, name: impl Into<String>, device: Arc<dyn BlockDevice>, description: impl Into<String>) {
        self.0.insert(name.into(), (device, description.into()));
    }

    /// A single export under `name`.
    pub fn single(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Self::new().with(name, device)
    }
}

impl ExportRegistry for StaticExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        self.0.get(name).map(|(d, _)| Arc::clone(d))
    }

    fn list(&self) -> Vec<(String, String)> {
        self.0.iter().map(|(n, (_, d))| (n.clone(), d.clone())).collect()
    }

    fn can_multi_conn(&self, _name: &str, _device: &dyn BlockDevice) -> bool {
        true
    }

    fn description(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|(_, d)| d.clone()).filter(|d| !d.is_empty())
    }
}
