//! The xenbus state machine over the in-memory xenstore, with real rings behind it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use xensnap_blkif::abi::*;
use xensnap_blkif::sim::*;
use xensnap_blkif::xenbus::*;
use xensnap_blkif::*;
use xensnap_blockdev::{BlockDevice, MemDisk};

const BE: &str = "/local/domain/0/backend/vbd/7/51712";
const FE: &str = "/local/domain/7/device/vbd/51712";
const PORT: u32 = 33;

/// Hands out the backend end of a pre-made event channel pair for port 33.
struct Binder(Mutex<Option<Arc<LocalEvtchn>>>);

impl EvtchnBinder for Binder {
    fn bind(&self, domid: u16, port: u32) -> Result<Arc<dyn EventChannel>, String> {
        if domid != 7 || port != PORT {
            return Err(format!("no event channel {port} in domain {domid}"));
        }
        let e = self.0.lock().unwrap().take().ok_or("already bound")?;
        Ok(e)
    }
}

struct World {
    xs: Arc<MemXenStore>,
    guest: Arc<TestGuest>,
    disk: Arc<MemDisk>,
    conn: RingConnector,
    xb: XenbusBackend,
    fe_evt: Arc<LocalEvtchn>,
}

fn world() -> World {
    let xs = MemXenStore::new();
    xs.write(&format!("{BE}/frontend"), FE).unwrap();
    xs.write(&format!("{BE}/frontend-id"), "7").unwrap();
    xs.write(&format!("{BE}/state"), "1").unwrap();
    xs.write(&format!("{FE}/backend"), BE).unwrap();
    xs.write(&format!("{FE}/state"), "1").unwrap();
    let guest = TestGuest::new(7);
    let disk = Arc::new(MemDisk::new(1 << 20));
    let (be_evt, fe_evt) = evtchn_pair();
    let conn = RingConnector::new(
        guest.clone(),
        Arc::new(Binder(Mutex::new(Some(be_evt)))),
        disk.clone() as Arc<dyn BlockDevice>,
        Features::default(),
    );
    let xb = XenbusBackend::new(xs.clone(), BE, Features::default()).unwrap();
    World { xs, guest, disk, conn, xb, fe_evt }
}

fn rd(xs: &MemXenStore, p: &str) -> Option<String> {
    xs.read(p).unwrap()
}

/// Process watch events until the store is quiet.
fn drain(w: &mut World) -> XenbusState {
    while w.xb.step(&mut w.conn, Some(Duration::from_millis(10))).unwrap().is_some() {}
    w.xb.state()
}

#[test]
fn handshake_io_close_and_reconnect() {
    let mut w = world();
    w.xb.start(&w.conn.disk_info()).unwrap();
    let be = |k: &str| rd(&w.xs, &format!("{BE}/{k}"));
    assert_eq!(be("state").as_deref(), Some("2"));
    assert_eq!(be("feature-flush-cache").as_deref(), Some("1"));
    assert_eq!(be("feature-barrier").as_deref(), Some("1"));
    assert_eq!(be("feature-discard").as_deref(), Some("1"));
    assert_eq!(be("discard-granularity").as_deref(), Some("4096"));
    assert_eq!(be("feature-max-indirect-segments").as_deref(), Some("256"));
    assert_eq!(be("max-ring-page-order").as_deref(), Some("4"));
    assert_eq!(be("feature-persistent").as_deref(), Some("1"));
    assert_eq!(be("sector-size").as_deref(), Some("512"));
    assert_eq!(be("sectors").as_deref(), Some("2048"));
    assert_eq!(be("info").as_deref(), Some("0"));
    assert_eq!(drain(&mut w), XenbusState::InitWait);

    // Frontend: two-page ring, x86_32 layout.
    let mut front = TestFront::new(w.guest.clone(), Abi::X86_32, 1, w.fe_evt.clone());
    w.xs.write(&format!("{FE}/ring-page-order"), "1").unwrap();
    w.xs.write(&format!("{FE}/ring-ref0"), &front.ring_refs[0].to_string()).unwrap();
    w.xs.write(&format!("{FE}/ring-ref1"), &front.ring_refs[1].to_string()).unwrap();
    w.xs.write(&format!("{FE}/event-channel"), &PORT.to_string()).unwrap();
    w.xs.write(&format!("{FE}/protocol"), "x86_32-abi").unwrap();
    w.xs.write(&format!("{FE}/state"), "3").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Connected);
    assert_eq!(rd(&w.xs, &format!("{BE}/state")).as_deref(), Some("4"));
    let ring = w.conn.ring().unwrap();
    assert_eq!(ring.geometry(), RingGeometry::new(Abi::X86_32, 2).unwrap());
    w.xs.write(&format!("{FE}/state"), "4").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Connected);

    // I/O through the worker thread.
    let data = vec![0x42u8; 4096];
    let mut b = front.make_buf(&[(0, 7)], Some(&data), true);
    let id = front.queue_io(BLKIF_OP_WRITE, 8, &mut b, false);
    front.push();
    let r = front.wait_responses(1, Duration::from_secs(5));
    assert_eq!((r[0].id, r[0].status), (id, 0));
    assert_eq!(&w.disk.snapshot()[4096..8192], &data[..]);
    // The checkpoint barrier through the connector's ring handle.
    // The response is visible to the frontend a moment before the worker's bookkeeping ends.
    assert!(ring.quiesce() <= 1);
    ring.resume();

    // Close.
    w.xs.write(&format!("{FE}/state"), "5").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Closing);
    w.xs.write(&format!("{FE}/state"), "6").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Closed);
    assert!(w.conn.ring().is_none());
    assert_eq!(ring.poll(), Poll::Stopped);

    // Reconnect after Closed (frontend starts over): InitWait again.
    w.xs.write(&format!("{FE}/state"), "1").unwrap();
    assert_eq!(drain(&mut w), XenbusState::InitWait);
}

fn expect_refused(setup: impl FnOnce(&World, &TestFront), needle: &str) {
    let mut w = world();
    w.xb.start(&w.conn.disk_info()).unwrap();
    drain(&mut w);
    let front = TestFront::new(w.guest.clone(), Abi::X86_64, 0, w.fe_evt.clone());
    w.xs.write(&format!("{FE}/ring-ref"), &front.ring_refs[0].to_string()).unwrap();
    w.xs.write(&format!("{FE}/event-channel"), &PORT.to_string()).unwrap();
    setup(&w, &front);
    w.xs.write(&format!("{FE}/state"), "3").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Closing, "{needle}");
    let err = rd(&w.xs, &format!("{BE}/error")).unwrap_or_default();
    assert!(err.contains(needle), "error {err:?} lacks {needle:?}");
    assert_eq!(w.xb.last_error(), Some(err.as_str()));
    assert!(w.conn.ring().is_none());
    // Frontend gives up: Closed.
    w.xs.write(&format!("{FE}/state"), "6").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Closed);
}

#[test]
fn bad_frontend_values_close_with_an_error() {
    let w =
        |k: &'static str, v: &'static str| move |w: &World, _: &TestFront| w.xs.write(&format!("{FE}/{k}"), v).unwrap();
    expect_refused(w("protocol", "sparc-abi"), "protocol");
    expect_refused(w("event-channel", "banana"), "event-channel");
    expect_refused(|w, _| w.xs.remove(&format!("{FE}/event-channel")).unwrap(), "event-channel missing");
    expect_refused(|w, _| w.xs.remove(&format!("{FE}/ring-ref")).unwrap(), "ring-ref missing");
    expect_refused(w("ring-page-order", "5"), "ring-page-order");
    expect_refused(w("ring-page-order", "1"), "ring-ref0 missing");
    expect_refused(w("multi-queue-num-queues", "4"), "multi-queue");
    expect_refused(w("ring-ref", "999999"), "not valid");
    expect_refused(w("event-channel", "34"), "no event channel");
    // A read-only grant for the ring.
    expect_refused(
        |w, _| {
            let p = Page::new();
            let g = w.guest.grant(&p, true);
            w.xs.write(&format!("{FE}/ring-ref"), &g.to_string()).unwrap();
        },
        "read-only",
    );
}

#[test]
fn toolstack_removal() {
    let mut w = world();
    w.xb.start(&w.conn.disk_info()).unwrap();
    drain(&mut w);
    let front = TestFront::new(w.guest.clone(), Abi::X86_64, 0, w.fe_evt.clone());
    w.xs.write(&format!("{FE}/ring-ref"), &front.ring_refs[0].to_string()).unwrap();
    w.xs.write(&format!("{FE}/event-channel"), &PORT.to_string()).unwrap();
    w.xs.write(&format!("{FE}/state"), "4").unwrap(); // straight to Connected is accepted too
    assert_eq!(drain(&mut w), XenbusState::Connected);
    // libxl: online = 0, backend state = Closing; the frontend then closes.
    w.xs.write(&format!("{BE}/online"), "0").unwrap();
    w.xs.write(&format!("{BE}/state"), "5").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Closing);
    assert!(w.conn.ring().is_none(), "rings stop at once on removal");
    w.xs.write(&format!("{FE}/state"), "6").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Closed);
    w.xb.unwatch().unwrap();
}

#[test]
fn read_only_disk_info() {
    let xs = MemXenStore::new();
    xs.write(&format!("{BE}/frontend"), FE).unwrap();
    xs.write(&format!("{BE}/frontend-id"), "7").unwrap();
    let mut xb = XenbusBackend::new(
        xs.clone(),
        BE,
        Features { discard: false, max_indirect_segments: 0, max_ring_page_order: 0, ..Features::default() },
    )
    .unwrap();
    let disk = MemDisk::from_vec(vec![0; 1000 * 512 + 100], true);
    xb.start(&DiskInfo::of(&disk)).unwrap();
    assert_eq!(rd(&xs, &format!("{BE}/info")).as_deref(), Some("4"));
    assert_eq!(rd(&xs, &format!("{BE}/sectors")).as_deref(), Some("1000"));
    assert_eq!(rd(&xs, &format!("{BE}/feature-discard")).as_deref(), Some("0"));
    assert_eq!(rd(&xs, &format!("{BE}/feature-max-indirect-segments")), None);
    assert_eq!(rd(&xs, &format!("{BE}/max-ring-page-order")), None);
    // Missing frontend path is a backend error.
    let xs2 = MemXenStore::new();
    assert!(XenbusBackend::new(xs2, BE, Features::default()).is_err());
}

#[test]
fn persistent_grants_negotiated_and_unmapped_on_close() {
    let mut w = world();
    w.xb.start(&w.conn.disk_info()).unwrap();
    assert_eq!(drain(&mut w), XenbusState::InitWait);
    assert_eq!(rd(&w.xs, &format!("{BE}/feature-persistent")).as_deref(), Some("1"));
    let mut front = TestFront::new(w.guest.clone(), Abi::X86_64, 0, w.fe_evt.clone());
    w.xs.write(&format!("{FE}/ring-ref"), &front.ring_refs[0].to_string()).unwrap();
    w.xs.write(&format!("{FE}/event-channel"), &PORT.to_string()).unwrap();
    w.xs.write(&format!("{FE}/feature-persistent"), "1").unwrap();
    w.xs.write(&format!("{FE}/state"), "3").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Connected);
    let ring = w.conn.ring().unwrap();
    assert!(ring.persistent());
    // A writable buffer used twice: mapped once, then hit.
    let mut b = front.make_buf(&[(0, 7)], Some(&[0x5au8; 4096]), false);
    for _ in 0..2 {
        let id = front.queue_io(BLKIF_OP_WRITE, 0, &mut b, false);
        front.push();
        let r = front.wait_responses(1, Duration::from_secs(5));
        assert_eq!((r[0].id, r[0].status), (id, 0));
    }
    assert_eq!(&w.disk.snapshot()[..4096], &[0x5au8; 4096][..]);
    let s = ring.stats();
    assert_eq!((s.persistent_misses, s.persistent_hits, s.persistent_grants), (1, 1, 1), "{s:?}");
    assert_eq!(w.guest.live_mappings(), 1);
    // Close: unmapped before we report Closed (the frontend then ends its grants).
    w.xs.write(&format!("{FE}/state"), "5").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Closing);
    w.xs.write(&format!("{FE}/state"), "6").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Closed);
    assert_eq!(w.guest.live_mappings(), 0);

    // A frontend without feature-persistent: grant copy only, nothing mapped.
    let mut w = world();
    w.xb.start(&w.conn.disk_info()).unwrap();
    drain(&mut w);
    let mut front = TestFront::new(w.guest.clone(), Abi::X86_64, 0, w.fe_evt.clone());
    w.xs.write(&format!("{FE}/ring-ref"), &front.ring_refs[0].to_string()).unwrap();
    w.xs.write(&format!("{FE}/event-channel"), &PORT.to_string()).unwrap();
    w.xs.write(&format!("{FE}/state"), "3").unwrap();
    assert_eq!(drain(&mut w), XenbusState::Connected);
    assert!(!w.conn.ring().unwrap().persistent());
    let mut b = front.make_buf(&[(0, 7)], None, false);
    let id = front.queue_io(BLKIF_OP_READ, 0, &mut b, false);
    front.push();
    let r = front.wait_responses(1, Duration::from_secs(5));
    assert_eq!((r[0].id, r[0].status), (id, 0));
    assert_eq!(w.guest.live_mappings(), 0);
}
