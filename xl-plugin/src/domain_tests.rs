//! Ordering and failure paths of the checkpoint driver over a fake Xen/xl/backends.
use super::*;
use std::cell::RefCell;
use std::rc::Rc;

/// A scripted world: xl save's progress is a sequence of ticks; the domain is Running,
/// then Suspended for `suspended_ticks` polls, then Running (`-c`) or Paused (`-p`).
#[derive(Default)]
struct World {
    log: Vec<String>,
    tick: u32,
    suspend_at: u32,
    resume_at: u32,
    end_at: u32,
    xl_fails: bool,
    mode: Option<Mode>,
    fail_op: Option<(String, String)>, // (op, vdev)
    take_unsupported: bool,
    // the domain resumes right after this many quiesce calls (the "late watch" race)
    resume_after_quiesce: bool,
    /// Backend replies without `cpu_ns` (a backend older than the CPU report).
    no_cpu_in_replies: bool,
    started: bool,
    unpaused: bool,
    removed: Vec<PathBuf>,
    checkpoints: Vec<(String, String)>, // (vdev, name)
    // what the disk saw relative to the guest: (vdev, taken while suspended?)
    taken_while: Vec<(String, DomState)>,
    // virtual clock (advanced by sleep) and the guest's writes: sectors written on xvda per
    // sleep while the guest runs
    clock: Duration,
    writes_per_sleep: u64,
    written: u64,
    // xl's tick at every wait_change (the driver's wait for the suspend)
    waits: Vec<u32>,
    // virtual clock when xl wrote the memory image's last byte (the tick before the resume)
    copy_end: Option<Duration>,
    // was the change watch set up before xl started?
    watched_before_xl: Option<bool>,
}

#[derive(Clone)]
struct Fake(Rc<RefCell<World>>);

impl World {
    fn state(&self) -> DomState {
        if !self.started || self.tick < self.suspend_at {
            DomState::Running
        } else if self.tick < self.resume_at {
            DomState::Suspended
        } else if self.unpaused {
            DomState::Running
        } else {
            match self.mode {
                Some(Mode::Save) if !self.xl_fails => DomState::Paused,
                _ => DomState::Running,
            }
        }
    }
}

struct Job(Rc<RefCell<World>>);
impl SaveJob for Job {
    fn poll(&mut self) -> Option<Result<(), String>> {
        let mut w = self.0.borrow_mut();
        w.tick += 1;
        if w.tick + 1 == w.resume_at {
            w.copy_end = Some(w.clock);
        }
        if w.tick >= w.end_at {
            let r = if w.xl_fails { "fail" } else { "ok" };
            w.log.push(format!("xl-save-exit({r})"));
            Some(if w.xl_fails { Err("exit status 1: Failed to save domain".into()) } else { Ok(()) })
        } else {
            None
        }
    }
    // xl goes on by itself: 20 ms per tick
    fn wait(&mut self) -> Result<(), String> {
        loop {
            self.0.borrow_mut().clock += Duration::from_millis(20);
            if let Some(r) = self.poll() {
                return r;
            }
        }
    }
}

impl Env for Fake {
    fn domain_state(&self, _domid: u32) -> DomState {
        self.0.borrow().state()
    }
    fn backend(&self, disk: &Disk, req: &Value) -> Result<Value, String> {
        let mut w = self.0.borrow_mut();
        let op = req["op"].as_str().unwrap().to_string();
        w.log.push(format!("{op}({})", disk.vdev));
        if op == "checkpoint-take" && w.take_unsupported {
            return Err("bad request: unknown variant `checkpoint-take`".into());
        }
        if let Some((fop, fdev)) = &w.fail_op {
            if *fop == op && *fdev == disk.vdev {
                return Err(format!("{op} refused by fake"));
            }
        }
        match op.as_str() {
            "checkpoint-barrier" => {
                if w.resume_after_quiesce {
                    w.resume_at = w.tick; // xl resumed the guest before the request was served
                }
                let fail = w.fail_op.clone().filter(|(_, fdev)| *fdev == disk.vdev).map(|(f, _)| f);
                match fail.as_deref() {
                    Some("barrier-quiesce") => return Err("quiesce failed: timed out after 2000 ms with 1 request(s) in flight; the ring was resumed, no checkpoint taken".into()),
                    Some("barrier-take") => return Err("take failed: no space; the ring was resumed, no checkpoint taken".into()),
                    _ => {}
                }
                let st = w.state();
                w.taken_while.push((disk.vdev.clone(), st));
                let n = req["name"].as_str().unwrap().to_string();
                w.checkpoints.push((disk.vdev.clone(), n));
                assert_eq!(req["defer_durable_ms"], json!(DEFER_DURABLE_MS));
                if fail.as_deref() == Some("barrier-lost") {
                    // served, but the reply never came
                    return Err("/run/xensnap/x.sock: connection closed without a full reply".into());
                }
                // the backend's process CPU as the `cpu_ns` fake (1/4 of the clock), its pid
                let cpu = (!w.no_cpu_in_replies).then_some(w.clock.as_nanos() as u64 / 4);
                Ok(
                    json!({"drained": 1, "connected": true, "quiesce_micros": 5, "take_micros": 7, "durable_deferred": true,
                          "cpu_ns": cpu, "pid": disk.pid}),
                )
            }
            "quiesce" => {
                if w.resume_after_quiesce {
                    w.resume_at = w.tick; // xl resumed the guest meanwhile
                }
                Ok(json!({"drained": 1, "connected": true}))
            }
            "checkpoint-take" | "checkpoint-create" => {
                let st = w.state();
                w.taken_while.push((disk.vdev.clone(), st));
                let n = req["name"].as_str().unwrap().to_string();
                w.checkpoints.push((disk.vdev.clone(), n));
                Ok(json!({}))
            }
            "stats" => {
                let b = if disk.vdev == "xvda" { w.written * 512 } else { 0 };
                Ok(json!({"requests": 0, "bytes_written": b}))
            }
            "checkpoint-delete" => {
                let n = req["checkpoint"].as_str().unwrap().to_string();
                let v = disk.vdev.clone();
                w.checkpoints.retain(|(d, c)| !(d == &v && c == &n));
                Ok(json!({}))
            }
            "durable-hold" => {
                assert_eq!(req["max_ms"], json!(DEFER_DURABLE_MS));
                assert!(!w.started, "a hold sent after xl started");
                Ok(json!({"held": true, "cpu_ns": 1, "pid": disk.pid}))
            }
            "durable-release" => {
                Ok(json!({"released": true, "cpu_ns": w.clock.as_nanos() as u64 / 4, "pid": disk.pid}))
            }
            _ => Ok(json!({})),
        }
    }
    fn start_save(&self, _domid: u32, _file: &Path, mode: Mode) -> Result<Box<dyn SaveJob>, String> {
        let mut w = self.0.borrow_mut();
        w.log.push(format!("xl-save-start({mode:?})"));
        w.started = true;
        w.mode = Some(mode);
        Ok(Box::new(Job(self.0.clone())))
    }
    fn unpause(&self, _domid: u32) -> Result<(), String> {
        let mut w = self.0.borrow_mut();
        w.log.push("unpause".into());
        w.unpaused = true;
        Ok(())
    }
    fn destroy(&self, _domid: u32) -> Result<(), String> {
        self.0.borrow_mut().log.push("destroy".into());
        Ok(())
    }
    fn remove_file(&self, p: &Path) {
        let mut w = self.0.borrow_mut();
        w.log.push("rm-memory".into());
        w.removed.push(p.to_path_buf());
    }
    fn sleep(&self, d: Duration) {
        let mut w = self.0.borrow_mut();
        w.clock += d;
        if w.state() == DomState::Running {
            w.written += w.writes_per_sleep;
        }
    }
    fn watch_changes(&self) {
        let mut w = self.0.borrow_mut();
        let before = !w.started;
        w.watched_before_xl.get_or_insert(before);
    }
    fn wait_change(&self, max: Duration) {
        let t = self.0.borrow().tick;
        self.0.borrow_mut().waits.push(t);
        self.sleep(max)
    }
    fn now(&self) -> Instant {
        base() + self.0.borrow().clock
    }
    // xl-snap uses 1/10 of the wall time, every backend process 1/4
    fn cpu_ns(&self, pid: Option<u32>) -> Option<u64> {
        let c = self.0.borrow().clock.as_nanos() as u64;
        Some(if pid.is_some() { c / 4 } else { c / 10 })
    }
    fn mtime(&self, _p: &Path) -> Option<SystemTime> {
        self.0.borrow().copy_end.map(|c| UNIX_EPOCH + c)
    }
    fn wall(&self) -> SystemTime {
        UNIX_EPOCH + self.0.borrow().clock
    }
}

fn base() -> Instant {
    static B: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *B.get_or_init(Instant::now)
}

fn disks() -> Vec<Disk> {
    ["xvda", "xvdb"]
        .iter()
        .map(|v| Disk {
            vdev: v.to_string(),
            backend: format!("/local/domain/0/backend/vbd/5/{v}"),
            socket: PathBuf::from(format!("/run/xensnap/{v}.sock")),
            image: PathBuf::from(format!("/img/{v}.qcow2")),
            pid: None,
            barrier_op: true,
            hold_op: true,
        })
        .collect()
}

/// Disks served by backends without `checkpoint-barrier`.
fn old_disks() -> Vec<Disk> {
    disks().into_iter().map(|d| Disk { barrier_op: false, hold_op: false, ..d }).collect()
}

fn world() -> Fake {
    Fake(Rc::new(RefCell::new(World { suspend_at: 3, resume_at: 10, end_at: 12, ..Default::default() })))
}

fn run(f: &Fake, mode: Mode) -> Result<BarrierReport, StepError> {
    snapshot(f, 5, &disks(), Path::new("/s/mem"), "c1", mode, &Opts::default())
}

fn run_old(f: &Fake, mode: Mode) -> Result<BarrierReport, StepError> {
    snapshot(f, 5, &old_disks(), Path::new("/s/mem"), "c1", mode, &Opts::default())
}

fn pos(log: &[String], s: &str) -> usize {
    log.iter().position(|x| x == s).unwrap_or_else(|| panic!("{s} not in {log:?}"))
}

#[test]
fn checkpoint_orders_quiesce_take_resume_inside_the_suspended_window() {
    let f = world();
    let rep = run_old(&f, Mode::Checkpoint).unwrap();
    let w = f.0.borrow();
    let l = &w.log;
    // every quiesce before every take, every take before any resume; all while suspended
    assert!(pos(l, "quiesce(xvdb)") < pos(l, "checkpoint-take(xvda)"), "{l:?}");
    assert!(pos(l, "checkpoint-take(xvdb)") < pos(l, "resume(xvda)"), "{l:?}");
    assert!(pos(l, "resume(xvdb)") < pos(l, "xl-save-exit(ok)"), "{l:?}");
    assert!(w.taken_while.iter().all(|(_, s)| *s == DomState::Suspended), "{:?}", w.taken_while);
    assert_eq!(w.checkpoints.len(), 2);
    assert!(rep.inside_window);
    assert_eq!(rep.drained, 2);
    assert!(w.removed.is_empty() && !w.log.contains(&"unpause".to_string()));
    // nothing touches the backends before the guest stopped
    assert_eq!(l[0], "xl-save-start(Checkpoint)");
    // an older backend: three requests per disk, its durability not deferred
    assert_eq!(rep.window_requests, 6);
    assert!(!rep.durable_deferred);
    assert!(!l.iter().any(|x| x.starts_with("durable-release")), "{l:?}");
}

#[test]
fn checkpoint_barrier_is_one_request_per_disk_inside_the_window_then_released() {
    let f = world();
    let rep = run(&f, Mode::Checkpoint).unwrap();
    let w = f.0.borrow();
    let l = &w.log;
    assert_eq!(
        l,
        &[
            "durable-hold(xvda)",
            "durable-hold(xvdb)",
            "xl-save-start(Checkpoint)",
            "checkpoint-barrier(xvda)",
            "checkpoint-barrier(xvdb)",
            "xl-save-exit(ok)",
            "durable-release(xvda)",
            "durable-release(xvdb)",
        ],
        "{l:?}"
    );
    assert!(w.taken_while.iter().all(|(_, s)| *s == DomState::Suspended), "{:?}", w.taken_while);
    assert_eq!(w.checkpoints.len(), 2);
    assert!(rep.inside_window && rep.durable_deferred);
    assert_eq!((rep.window_requests, rep.drained, rep.quiesce_us), (2, 2, 10));
    assert_eq!(w.watched_before_xl, Some(true));
    // the report lines up with wall clocks: xl started at the fake's epoch, suspend seen 400 ms later
    assert_eq!((rep.xl_start_wall_us, rep.suspend_seen_wall_us), (0, 400_000));
}

#[test]
fn one_request_barrier_failed_quiesce_names_the_step_and_deletes_the_first_disk() {
    let f = world();
    f.0.borrow_mut().fail_op = Some(("barrier-quiesce".into(), "xvdb".into()));
    let e = run(&f, Mode::Checkpoint).unwrap_err();
    assert_eq!(e.step, "quiesce");
    assert!(e.msg.contains("xvdb") && e.msg.contains("timed out"), "{e}");
    let w = f.0.borrow();
    assert!(w.checkpoints.is_empty(), "{:?}", w.checkpoints);
    assert!(pos(&w.log, "checkpoint-delete(xvda)") < pos(&w.log, "xl-save-exit(ok)"), "{:?}", w.log);
    // the backend resumed its own ring and took nothing
    assert!(!w.log.iter().any(|l| l == "resume(xvdb)" || l == "checkpoint-delete(xvdb)"), "{:?}", w.log);
    // the waiting background work is released once xl is done
    assert!(pos(&w.log, "xl-save-exit(ok)") < pos(&w.log, "durable-release(xvda)"));
    assert_eq!(w.removed, vec![PathBuf::from("/s/mem")]);
    assert_eq!(w.state(), DomState::Running);
}

#[test]
fn one_request_barrier_failed_take_deletes_the_first_disk() {
    let f = world();
    f.0.borrow_mut().fail_op = Some(("barrier-take".into(), "xvdb".into()));
    let e = run(&f, Mode::Checkpoint).unwrap_err();
    assert_eq!(e.step, "disk-checkpoint");
    assert!(e.msg.contains("no space"), "{e}");
    assert!(e.to_string().contains("deleted on xvda"), "{e}");
    let w = f.0.borrow();
    assert!(w.checkpoints.is_empty(), "{:?}", w.checkpoints);
    assert!(!w.log.contains(&"checkpoint-delete(xvdb)".into()), "{:?}", w.log);
    assert_eq!(w.removed.len(), 1);
}

#[test]
fn one_request_barrier_lost_reply_resumes_and_deletes_on_that_disk_too() {
    let f = world();
    f.0.borrow_mut().fail_op = Some(("barrier-lost".into(), "xvda".into()));
    let e = run(&f, Mode::Checkpoint).unwrap_err();
    assert_eq!(e.step, "disk-checkpoint");
    let w = f.0.borrow();
    assert!(pos(&w.log, "resume(xvda)") < pos(&w.log, "checkpoint-delete(xvda)"), "{:?}", w.log);
    assert!(w.checkpoints.is_empty(), "served before the reply was lost, then deleted: {:?}", w.checkpoints);
    assert!(!w.log.contains(&"checkpoint-barrier(xvdb)".into()));
    assert_eq!(w.removed.len(), 1);
}

#[test]
fn one_request_barrier_after_the_resume_is_a_clean_failure() {
    let f = world();
    f.0.borrow_mut().resume_after_quiesce = true;
    let e = run(&f, Mode::Checkpoint).unwrap_err();
    assert_eq!(e.step, "suspend-window");
    let w = f.0.borrow();
    assert!(w.checkpoints.is_empty(), "{:?}", w.checkpoints);
    assert!(w.log.contains(&"checkpoint-delete(xvda)".into()) && w.log.contains(&"checkpoint-delete(xvdb)".into()));
    assert_eq!(w.removed.len(), 1);
    assert_eq!(w.state(), DomState::Running);
}

#[test]
fn waits_on_domain_changes_only_until_the_suspend_is_seen() {
    let f = world();
    run(&f, Mode::Checkpoint).unwrap();
    let w = f.0.borrow();
    // ticks 1 and 2 are before the suspend (suspend_at = 3); after the barrier: xl's exit
    assert_eq!(w.waits, vec![1, 2], "{:?}", w.waits);
}

#[test]
fn take_falls_back_to_checkpoint_create() {
    let f = world();
    f.0.borrow_mut().take_unsupported = true;
    run_old(&f, Mode::Checkpoint).unwrap();
    let w = f.0.borrow();
    assert!(w.log.contains(&"checkpoint-create(xvda)".to_string()));
    assert_eq!(w.checkpoints.len(), 2);
}

#[test]
fn failed_quiesce_resumes_backends_and_discards_memory() {
    let f = world();
    f.0.borrow_mut().fail_op = Some(("quiesce".into(), "xvdb".into()));
    let e = run_old(&f, Mode::Checkpoint).unwrap_err();
    assert_eq!(e.step, "quiesce");
    assert!(e.msg.contains("xvdb"), "{e}");
    let w = f.0.borrow();
    assert!(w.log.contains(&"resume(xvda)".into()) && w.log.contains(&"resume(xvdb)".into()), "{:?}", w.log);
    assert!(w.checkpoints.is_empty());
    assert_eq!(w.removed, vec![PathBuf::from("/s/mem")]);
    assert!(e.to_string().contains("memory image /s/mem deleted"), "{e}");
    assert_eq!(w.state(), DomState::Running);
}

#[test]
fn failed_take_on_second_disk_deletes_the_first_and_resumes() {
    let f = world();
    f.0.borrow_mut().fail_op = Some(("checkpoint-take".into(), "xvdb".into()));
    let e = run_old(&f, Mode::Checkpoint).unwrap_err();
    assert_eq!(e.step, "disk-checkpoint");
    let w = f.0.borrow();
    assert!(w.checkpoints.is_empty(), "half-made disk checkpoint left: {:?}", w.checkpoints);
    assert!(pos(&w.log, "checkpoint-delete(xvda)") < pos(&w.log, "resume(xvda)"));
    assert!(w.log.contains(&"resume(xvdb)".into()));
    assert_eq!(w.removed.len(), 1);
    assert_eq!(w.state(), DomState::Running);
}

#[test]
fn failed_memory_save_deletes_the_disk_checkpoint() {
    let f = world();
    f.0.borrow_mut().xl_fails = true;
    let e = run(&f, Mode::Checkpoint).unwrap_err();
    assert_eq!(e.step, "memory-save");
    assert!(e.msg.contains("Failed to save domain"));
    let w = f.0.borrow();
    assert!(w.checkpoints.is_empty());
    assert!(pos(&w.log, "xl-save-exit(fail)") < pos(&w.log, "checkpoint-delete(xvda)"));
    assert!(pos(&w.log, "xl-save-exit(fail)") < pos(&w.log, "durable-release(xvdb)"));
    assert_eq!(w.removed.len(), 1);
    assert_eq!(w.state(), DomState::Running);
}

#[test]
fn missed_window_is_a_clean_failure() {
    let f = world();
    f.0.borrow_mut().resume_after_quiesce = true;
    let e = run_old(&f, Mode::Checkpoint).unwrap_err();
    assert_eq!(e.step, "suspend-window");
    let w = f.0.borrow();
    assert!(w.checkpoints.is_empty() && w.taken_while.is_empty());
    assert!(w.log.contains(&"resume(xvda)".into()) && w.log.contains(&"resume(xvdb)".into()));
    assert_eq!(w.removed.len(), 1);
}

#[test]
fn never_suspended_is_a_failure_not_a_silent_memory_only_checkpoint() {
    let f = world();
    {
        let mut w = f.0.borrow_mut();
        w.suspend_at = 100;
        w.resume_at = 100;
    }
    let e = run(&f, Mode::Checkpoint).unwrap_err();
    assert_eq!(e.step, "suspend-window");
    assert_eq!(f.0.borrow().removed.len(), 1);
    assert!(!f.0.borrow().log.iter().any(|l| l.starts_with("quiesce")));
    // the background work held before xl started is let go all the same
    let w = f.0.borrow();
    assert!(pos(&w.log, "durable-hold(xvdb)") < pos(&w.log, "xl-save-start(Checkpoint)"), "{:?}", w.log);
    assert!(pos(&w.log, "xl-save-exit(ok)") < pos(&w.log, "durable-release(xvda)"), "{:?}", w.log);
    assert!(w.log.contains(&"durable-release(xvdb)".into()), "{:?}", w.log);
}

#[test]
fn a_failed_hold_is_not_fatal() {
    let f = world();
    f.0.borrow_mut().fail_op = Some(("durable-hold".into(), "xvda".into()));
    run(&f, Mode::Checkpoint).unwrap();
    let w = f.0.borrow();
    assert_eq!(w.checkpoints.len(), 2);
    assert!(pos(&w.log, "xl-save-exit(ok)") < pos(&w.log, "durable-release(xvda)"), "{:?}", w.log);
}

#[test]
fn save_mode_leaves_paused_on_success_and_unpauses_on_failure() {
    let f = world();
    run(&f, Mode::Save).unwrap();
    assert_eq!(f.0.borrow().state(), DomState::Paused);
    assert!(!f.0.borrow().log.contains(&"unpause".into()));
    // the caller's finishing step fails: everything undone, domain runs
    let e = abort_save(&f, 5, &disks(), Path::new("/s/mem"), "c1", "write-save-file", "disk full".into());
    assert_eq!(e.step, "write-save-file");
    assert_eq!(f.0.borrow().state(), DomState::Running);
    assert!(f.0.borrow().checkpoints.is_empty());

    let f = world();
    f.0.borrow_mut().fail_op = Some(("checkpoint-take".into(), "xvda".into()));
    let e = run_old(&f, Mode::Save).unwrap_err();
    assert_eq!(e.step, "disk-checkpoint");
    let w = f.0.borrow();
    assert!(w.log.contains(&"unpause".into()), "{:?}", w.log);
    assert!(!w.log.contains(&"destroy".into()));
    assert_eq!(w.state(), DomState::Running);
}

fn uopts(before_ms: u64) -> UnsafeOpts {
    UnsafeOpts {
        before: Duration::from_millis(before_ms),
        min_written_sectors: 3,
        write_wait: Duration::from_secs(10),
        poll: Duration::from_millis(5),
    }
}

#[test]
fn negative_control_takes_disk_while_running_and_waits_for_guest_writes() {
    let f = world();
    f.0.borrow_mut().writes_per_sleep = 1;
    let r = unsafe_disk_first(&f, 5, &disks(), Path::new("/s/mem"), "bad", &uopts(0)).unwrap();
    let w = f.0.borrow();
    assert!(w.taken_while.iter().all(|(_, s)| *s == DomState::Running));
    assert!(pos(&w.log, "checkpoint-take(xvdb)") < pos(&w.log, "stats(xvda)"), "{:?}", w.log);
    assert!(pos(&w.log, "checkpoint-take(xvda)") < pos(&w.log, "xl-save-start(Checkpoint)"));
    // xl only started once 3 sectors were written after the take, at 1 per 5 ms poll
    assert_eq!(r.written_after_take_at_xl_start, 3);
    assert_eq!(r.first_writes_seen_us, 15_000);
    assert_eq!(w.checkpoints.len(), 2);
    // the guest kept writing until the suspend, which the driver saw
    assert!(r.written_after_take_at_suspend.unwrap() >= 3, "{r:?}");
    assert!(r.suspend_seen_us.is_some());
}

#[test]
fn negative_control_keeps_the_minimum_delay() {
    let f = world();
    f.0.borrow_mut().writes_per_sleep = 10;
    let r = unsafe_disk_first(&f, 5, &disks(), Path::new("/s/mem"), "bad", &uopts(300)).unwrap();
    assert_eq!(r.first_writes_seen_us, 5_000);
    assert!(r.xl_started_us >= 300_000, "{r:?}");
    assert!(r.written_after_take_at_xl_start >= 600, "{r:?}");
}

#[test]
fn negative_control_fails_loudly_when_the_guest_does_not_write() {
    let f = world();
    f.0.borrow_mut().writes_per_sleep = 0;
    let e = unsafe_disk_first(&f, 5, &disks(), Path::new("/s/mem"), "bad", &uopts(0)).unwrap_err();
    assert_eq!(e.step, "unsafe-guest-writes");
    assert!(e.msg.contains("wrote 0 sector(s)"), "{e}");
    let w = f.0.borrow();
    assert!(w.checkpoints.is_empty(), "{:?}", w.checkpoints);
    assert!(!w.log.iter().any(|l| l.starts_with("xl-save-start")), "{:?}", w.log);
    // and the bound is honoured (10 s of virtual time, not forever)
    assert!(w.clock >= Duration::from_secs(10) && w.clock < Duration::from_secs(11), "{:?}", w.clock);
}

#[test]
fn negative_control_counts_only_writes_after_the_take() {
    let f = world();
    {
        let mut w = f.0.borrow_mut();
        w.written = 1_000_000;
        w.writes_per_sleep = 1;
    }
    let r = unsafe_disk_first(&f, 5, &disks(), Path::new("/s/mem"), "bad", &uopts(0)).unwrap();
    assert_eq!(r.sectors_at_take, 1_000_000);
    assert_eq!(r.written_after_take_at_xl_start, 3);
}

#[test]
fn negative_control_failed_xl_deletes_the_disk_checkpoint() {
    let f = world();
    {
        let mut w = f.0.borrow_mut();
        w.writes_per_sleep = 1;
        w.xl_fails = true;
    }
    let e = unsafe_disk_first(&f, 5, &disks(), Path::new("/s/mem"), "bad", &uopts(0)).unwrap_err();
    assert_eq!(e.step, "memory-save");
    assert!(f.0.borrow().checkpoints.is_empty());
    assert_eq!(f.0.borrow().removed.len(), 1);
}

fn fake_xl_file(config: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = XL_MAGIC.to_vec();
    v.extend_from_slice(&0x0102_0304u32.to_ne_bytes());
    v.extend_from_slice(&1u32.to_ne_bytes()); // mandatory: JSON config
    v.extend_from_slice(&0u32.to_ne_bytes());
    v.extend_from_slice(&((4 + config.len()) as u32).to_ne_bytes());
    v.extend_from_slice(&(config.len() as u32).to_ne_bytes());
    v.extend_from_slice(config);
    v.extend_from_slice(body);
    v
}

#[test]
fn metadata_rides_in_the_xl_header_after_the_config() {
    // (what the backend serves is not part of the metadata: a restore asks the backend again)
    let meta =
        Meta { version: 1, domain: "g".into(), domid: 5, disk_checkpoint: "c1".into(), disks: old_disks(), created: 7 };
    let cfg = br#"{"c_info":{"name":"g"}}"#;
    let body = b"LibxenguestStream....memory....".repeat(100);
    let src = fake_xl_file(cfg, &body);
    assert_eq!(read_embedded_meta(&mut &src[..]).unwrap(), None);
    let mut out = Vec::new();
    embed_meta(&mut &src[..], &mut out, &meta).unwrap();
    assert_eq!(read_embedded_meta(&mut &out[..]).unwrap(), Some(meta));
    // What xl's restore reads: magic, flags unchanged, config first, stream after optdata.
    assert_eq!(&out[..40], &src[..40]);
    let olen = u32::from_ne_bytes(out[44..48].try_into().unwrap()) as usize;
    let clen = u32::from_ne_bytes(out[48..52].try_into().unwrap()) as usize;
    assert_eq!(&out[52..52 + clen], cfg);
    assert_eq!(&out[48 + olen..], &body[..]);
    assert!(embed_meta(
        &mut &b"garbage".repeat(10)[..],
        &mut Vec::new(),
        &Meta { disks: vec![], ..read_embedded_meta(&mut &out[..]).unwrap().unwrap() }
    )
    .is_err());
}

#[test]
fn names() {
    assert!(valid_name("ck-1_2.3"));
    assert!(!valid_name("../x") && !valid_name("") && !valid_name("a b") && !valid_name(".h"));
}

#[test]
fn window_accounting_counts_cpu_from_the_suspend_to_the_resume() {
    let f = world();
    // both disks served by one process: counted once
    let d: Vec<Disk> = disks().into_iter().map(|d| Disk { pid: Some(77), ..d }).collect();
    let rep = snapshot(&f, 5, &d, Path::new("/s/mem"), "c1", Mode::Checkpoint, &Opts::default()).unwrap();
    // suspend seen at tick 3 after two 200 ms waits; then xl runs 20 ms per tick: the copy
    // ends at tick 9, xl exits at tick 12; the fake barrier takes no time
    assert_eq!(rep.suspend_seen_after_us, 400_000);
    assert_eq!(rep.copy_end_us, Some(120_000));
    assert_eq!(rep.xl_exit_us, 180_000);
    assert_eq!(rep.barrier_after_copy_us, Some(0));
    assert_eq!(rep.cpu_own_pre_us, Some(40_000));
    assert_eq!(rep.cpu_own_barrier_us, Some(0));
    assert_eq!(rep.cpu_own_window_us, Some(18_000));
    assert_eq!(rep.cpu_backend_window_us, Some(45_000));
    assert_eq!(rep.added_bound_us, Some(63_000));
    assert_eq!(rep.added_bound_all_us, Some(103_000));
}

#[test]
fn window_accounting_unknown_backend_pid_gives_no_bound() {
    // older backends (no checkpoint-barrier): their CPU comes from /proc, which needs the pid
    let f = world();
    let rep = run_old(&f, Mode::Checkpoint).unwrap();
    assert_eq!(rep.cpu_backend_window_us, None);
    assert_eq!(rep.added_bound_us, None);
    assert!(rep.cpu_own_window_us.is_some() && rep.copy_end_us.is_some());
}

#[test]
fn window_accounting_takes_the_backends_cpu_from_their_replies() {
    // one-request backends report their CPU themselves: the pid from /proc is not needed
    // (and /proc is not read: the fake's cpu_ns(Some(pid)) would say 1/4 of the clock too,
    // but each process is counted once only through its replies' pid)
    let f = world();
    let d: Vec<Disk> = disks().into_iter().map(|d| Disk { pid: Some(77), ..d }).collect();
    let rep = snapshot(&f, 5, &d, Path::new("/s/mem"), "c1", Mode::Checkpoint, &Opts::default()).unwrap();
    assert_eq!(rep.cpu_backend_window_us, Some(45_000));
    // two processes: each counted
    let f = world();
    let d: Vec<Disk> = disks().into_iter().enumerate().map(|(i, d)| Disk { pid: Some(70 + i as u32), ..d }).collect();
    let rep = snapshot(&f, 5, &d, Path::new("/s/mem"), "c1", Mode::Checkpoint, &Opts::default()).unwrap();
    assert_eq!(rep.cpu_backend_window_us, Some(90_000));
    // a backend whose reply lacks cpu_ns: no backend account, no bound
    let f = world();
    f.0.borrow_mut().no_cpu_in_replies = true;
    let rep = run(&f, Mode::Checkpoint).unwrap();
    assert_eq!(rep.cpu_backend_window_us, None);
    assert_eq!(rep.added_bound_us, None);
}

#[test]
fn barrier_outlasting_the_copy_adds_to_the_bound() {
    let t = base();
    let m =
        |ms: u64, own: u64, be: u64| CpuMark { at: t + Duration::from_millis(ms), own: Some(own), backends: Some(be) };
    let mut rep = BarrierReport { barrier_us: 5_000, ..Default::default() };
    account(
        &mut rep,
        Some(1_000_000),
        m(0, 3_000_000, 10_000_000),
        m(5, 4_000_000, 12_000_000),
        m(9, 4_500_000, 12_500_000),
        Some(3_000),
        t + Duration::from_millis(30),
    );
    assert_eq!(rep.barrier_after_copy_us, Some(2_000));
    assert_eq!(rep.cpu_own_pre_us, Some(2_000));
    assert_eq!(rep.cpu_own_barrier_us, Some(1_000));
    assert_eq!(rep.cpu_own_window_us, Some(1_500));
    assert_eq!(rep.cpu_backend_window_us, Some(2_500));
    assert_eq!(rep.added_bound_us, Some(6_000));
    assert_eq!(rep.added_bound_all_us, Some(8_000));
    assert_eq!(rep.xl_exit_us, 30_000);
}

// The kept backend connections (`Conns`) are tested in xensnap-control.

#[test]
fn xl_stderr_goes_to_an_unlinked_file_and_into_the_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let xl = dir.path().join("fake-xl");
    std::fs::write(
        &xl,
        "#!/bin/sh\ncase \"$4\" in *fail*) i=0; while [ $i -lt 50 ]; do echo \"Frames $i%\" >&2; i=$((i+1)); done; \
         echo \"$1 $2 $3: Failed to save domain\" >&2; exit 1;; esac\necho fine >&2\n",
    )
    .unwrap();
    std::fs::set_permissions(&xl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let xl = xl.to_str().unwrap();
    let mem = dir.path().join("mem");
    // success: nothing reported, nothing left in the directory
    let mut j = super::real::spawn_xl(xl, &["save", "-c", "5"], &mem).unwrap();
    assert_eq!(j.wait(), Ok(()));
    let left = || std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(left(), 1, "only the fake xl");
    // failure: everything xl wrote is in the message (read from the unlinked file)
    let mut j = super::real::spawn_xl(xl, &["save", "-c", "5"], &dir.path().join("fail-mem")).unwrap();
    let e = j.wait().unwrap_err();
    assert!(e.contains("Frames 49%") && e.contains("save -c 5: Failed to save domain"), "{e}");
    assert_eq!(left(), 1);
    // no directory for the file: a pipe instead, same message (poll path)
    let mut j = super::real::spawn_xl(xl, &["save", "-c", "5"], &dir.path().join("none/fail-mem")).unwrap();
    let r = loop {
        if let Some(r) = j.poll() {
            break r;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(r.unwrap_err().contains("Failed to save domain"));
}
