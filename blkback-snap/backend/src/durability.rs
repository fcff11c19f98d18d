//! The background durability worker of one served qcow2 image.
//!
//! One thread per image, started with the device (outside any suspended window) and idle on
//! a condition variable until there is work: a take that is not deferred asks it to run at
//! once ([`Durability::run_now`]); `durable-hold` and `checkpoint-barrier {defer_durable_ms}`
//! hold *all* the work back ([`Durability::defer`]: a driver already running stops after its
//! current step, work asked for meanwhile waits) until `durable-release`
//! ([`Durability::release`]) or the deadline.
//! Inside the window the barrier therefore only sets a field and wakes the sleeping thread —
//! no thread is created there (a thread start is a dozen system calls and fresh stack pages,
//! each a trap through Xen on a PV dom0).
//!
//! While it runs, the worker makes every pending piece of background work durable
//! ([`SharedImage::drive_durability`]), including work queued meanwhile. It ends when the
//! device drops it ([`Durability::stop`]) once it is idle.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use xensnap_qcow2::{Qcow2, SharedImage};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct State {
    /// Drive the pending work now.
    run: bool,
    /// Held back until `durable-release` or this deadline.
    hold_until: Option<Instant>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    st: Mutex<State>,
    cv: Condvar,
}

/// Handle on an image's durability worker (see the module docs).
pub struct Durability {
    shared: Arc<Shared>,
    /// No worker could be started: fall back to one thread per request (as a last resort).
    image: Option<Arc<Mutex<Qcow2>>>,
}

impl Durability {
    /// Start the worker of `image`. If the thread cannot be created the handle still works,
    /// starting a driver thread per request instead.
    pub fn start(image: Arc<Mutex<Qcow2>>) -> Self {
        let shared = Arc::new(Shared::default());
        let s2 = Arc::clone(&shared);
        let img = SharedImage(Arc::clone(&image));
        match std::thread::Builder::new().name("durability".into()).spawn(move || worker(&s2, &img)) {
            Ok(_) => Durability { shared, image: None },
            Err(e) => {
                tracing::warn!("starting the durability worker: {e}; one thread per checkpoint instead");
                Durability { shared, image: Some(image) }
            }
        }
    }

    /// Make the pending work durable now (also what a deferral is waiting for).
    pub fn run_now(&self) {
        if let Some(img) = &self.image {
            let img = SharedImage(Arc::clone(img));
            std::thread::spawn(move || img.drive_durability(None));
            return;
        }
        lock(&self.shared.st).run = true;
        self.shared.cv.notify_one();
    }

    /// Hold all the work back until [`Durability::release`] or `max` from now: a driver
    /// that is running stops after its current step, and [`Durability::run_now`] waits for
    /// the release too. A deferral already waiting is joined (its deadline kept). False if
    /// it cannot be held (started at once instead).
    pub fn defer(&self, max: Duration) -> bool {
        if self.image.is_some() {
            self.run_now();
            return false;
        }
        let mut st = lock(&self.shared.st);
        if st.hold_until.is_none() {
            st.hold_until = Some(Instant::now() + max);
            drop(st);
            // the worker sleeps without a timeout: wake it to wait for the deadline
            self.shared.cv.notify_one();
        }
        true
    }

    /// Start the held-back work: true if a deferral was waiting.
    pub fn release(&self) -> bool {
        let mut st = lock(&self.shared.st);
        if st.hold_until.take().is_none() {
            return false;
        }
        st.run = true;
        drop(st);
        self.shared.cv.notify_one();
        true
    }

    /// Let the worker end (after the work it is running, if any).
    pub fn stop(&self) {
        lock(&self.shared.st).stop = true;
        self.shared.cv.notify_one();
    }
}

impl Drop for Durability {
    fn drop(&mut self) {
        self.stop();
    }
}

fn worker(s: &Shared, img: &SharedImage) {
    let mut st = lock(&s.st);
    loop {
        if st.stop {
            return;
        }
        let now = Instant::now();
        if let Some(d) = st.hold_until {
            if now >= d {
                tracing::warn!("no durable-release before the deadline: making the checkpoint durable now");
                st.hold_until = None;
                st.run = true;
            }
        }
        if st.run && st.hold_until.is_none() {
            st.run = false;
            drop(st);
            // a hold placed meanwhile stops the driver after its current step; the work
            // stays pending until the release (or the deadline) asks for it again
            img.drive_durability_while(None, || lock(&s.st).hold_until.is_none());
            st = lock(&s.st);
            continue;
        }
        st = match st.hold_until {
            Some(d) => s.cv.wait_timeout(st, d.saturating_duration_since(now)).unwrap_or_else(|e| e.into_inner()).0,
            None => s.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xensnap_qcow2::{CheckpointState, CreateOptions};

    fn image(dir: &std::path::Path) -> Arc<Mutex<Qcow2>> {
        let p = dir.join("d.qcow2");
        let opts = CreateOptions { size: 16 << 20, cluster_bits: 16, refcount_order: 4 };
        let mut q = Qcow2::create_file(&p, &opts).unwrap();
        q.write(0, &[7u8; 65536]).unwrap();
        Arc::new(Mutex::new(q))
    }

    /// An image with a taken checkpoint "a" and its durability worker.
    fn taken() -> (tempfile::TempDir, Arc<Mutex<Qcow2>>, Durability) {
        let dir = tempfile::tempdir().unwrap();
        let q = image(dir.path());
        let d = Durability::start(Arc::clone(&q));
        lock(&q).checkpoint_take("a").unwrap();
        (dir, q, d)
    }

    fn state(q: &Arc<Mutex<Qcow2>>) -> CheckpointState {
        lock(q).checkpoint_list()[0].state
    }

    fn wait_for(q: &Arc<Mutex<Qcow2>>, want: CheckpointState) {
        let t = Instant::now();
        while state(q) != want {
            assert!(t.elapsed() < Duration::from_secs(10), "never {want:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn held_until_released_then_runs() {
        let (_dir, q, d) = taken();
        assert!(d.defer(Duration::from_secs(60)));
        assert!(d.defer(Duration::from_secs(1)), "a second deferral joins the first");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(state(&q), CheckpointState::Taken, "held (the 1 s of the second deferral is not its deadline)");
        assert!(d.release());
        wait_for(&q, CheckpointState::Durable);
        assert!(!d.release(), "nothing left to release");
    }

    #[test]
    fn work_asked_for_during_a_hold_waits_for_the_release() {
        let (_dir, q, d) = taken();
        assert!(d.defer(Duration::from_secs(60)));
        // e.g. a take or a deletion that is not deferred itself
        d.run_now();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(state(&q), CheckpointState::Taken, "ran during the hold");
        assert!(d.release());
        wait_for(&q, CheckpointState::Durable);
    }

    #[test]
    fn deadline_starts_the_work_and_ends_the_hold() {
        let (_dir, q, d) = taken();
        let t = Instant::now();
        assert!(d.defer(Duration::from_millis(150)));
        wait_for(&q, CheckpointState::Durable);
        assert!(t.elapsed() >= Duration::from_millis(150), "{:?}", t.elapsed());
        assert!(!d.release(), "the hold ended at its deadline");
    }

    #[test]
    fn run_now_and_stop() {
        let (_dir, q, d) = taken();
        d.run_now();
        wait_for(&q, CheckpointState::Durable);
        // the worker holds a reference to the image until it is stopped
        assert_eq!(Arc::strong_count(&q), 2);
        drop(d);
        let t = Instant::now();
        while Arc::strong_count(&q) > 1 {
            assert!(t.elapsed() < Duration::from_secs(5), "worker did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
