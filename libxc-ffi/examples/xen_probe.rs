//! Probe of every Xen interface libxc-ffi wraps. Run as root in a real dom0:
//!
//! ```text
//! cargo run -p libxc-ffi --example xen_probe            # or copy the binary into dom0
//! ```
//!
//! It needs the xen-evtchn, xen-gntdev, xen-gntalloc, xen-privcmd modules, xenfs mounted and
//! xenstored running (`/etc/init.d/xen start`). Everything runs inside dom0 alone: dom0
//! grants pages to itself (gntalloc) and maps/copies them back (gntdev), and binds an event
//! channel to itself. Prints one line per check; exit status = number of failed checks.
//! Outside Xen it prints why each interface cannot be opened and exits non-zero.

use std::time::Duration;

use libxc_ffi::gnttab::{CopySegment, ForeignPage, SgSeg};
use libxc_ffi::{Evtchn, GntShr, Gnttab, Prot, SharedMem, XenCtrl, XenStore};

type R = Result<String, Box<dyn std::error::Error>>;

struct Probe {
    failed: u32,
    passed: u32,
}

impl Probe {
    fn check(&mut self, name: &str, f: impl FnOnce() -> R) {
        match f() {
            Ok(detail) => {
                self.passed += 1;
                println!("OK    {name}: {detail}");
            }
            Err(e) => {
                self.failed += 1;
                println!("FAIL  {name}: {e}");
            }
        }
    }
}

/// What a backend pays to move 1 MiB of cached file data into a guest's pages, each way it
/// can: `preadv` into 256 grants mapped one by one (persistent grants), the same into this
/// process's own pages, a grant copy (GNTTABOP_copy) from a buffer, and 8-byte volatile
/// copies from a buffer into the mapped grants. Informational: the numbers are printed, a
/// failure means only that a call failed.
fn copy_costs(shr: &GntShr) -> R {
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::time::Instant;
    const PAGES: usize = 256;
    let gt = Gnttab::open()?;
    gt.set_max_grants(PAGES as u32 + 8)?;
    let pages = shr.share_pages(0, PAGES, true)?;
    let maps = pages.refs().iter().map(|&r| gt.map_grant_ref(0, r, Prot::ReadWrite)).collect::<Result<Vec<_>, _>>()?;
    let own = libxc_ffi::LocalPages::new(PAGES);
    let path = std::env::temp_dir().join(format!("xen_probe_copy.{}", std::process::id()));
    let data: Vec<u8> = (0..PAGES * 4096).map(|i| (i % 253) as u8).collect();
    std::fs::File::create(&path)?.write_all(&data)?;
    let file = std::fs::File::open(&path)?;
    let _ = std::fs::remove_file(&path);
    let best =
        |f: &mut dyn FnMut() -> Result<(), Box<dyn std::error::Error>>| -> Result<f64, Box<dyn std::error::Error>> {
            let mut b = f64::MAX;
            for _ in 0..8 {
                let t = Instant::now();
                f()?;
                b = b.min(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(b)
        };
    let regions = maps.iter().map(|m| m.io_region(0, 4096)).collect::<Result<Vec<_>, _>>()?;
    let t_grants = best(&mut || Ok(libxc_ffi::preadv_exact(file.as_fd(), 0, &regions)?))?;
    let mut back = vec![0u8; 4096];
    maps[PAGES - 1].read_bytes(0, &mut back)?;
    if back[..] != data[(PAGES - 1) * 4096..] {
        return Err(bail("preadv into the mapped grants: last page differs"));
    }
    let own_regions = (0..PAGES).map(|i| own.io_region(i * 4096, 4096)).collect::<Result<Vec<_>, _>>()?;
    let t_own = best(&mut || Ok(libxc_ffi::preadv_exact(file.as_fd(), 0, &own_regions)?))?;
    let segs: Vec<SgSeg> = pages.refs().iter().map(|&gref| SgSeg { gref, offset: 0, len: 4096 }).collect();
    let t_copy = best(&mut || {
        let st = gt.copy_to_guest(0, &segs, &data)?;
        if st.iter().all(|s| s.is_ok()) {
            Ok(())
        } else {
            Err(bail("grant copy status"))
        }
    })?;
    let t_volatile = best(&mut || {
        for (i, m) in maps.iter().enumerate() {
            m.write_bytes(0, &data[i * 4096..(i + 1) * 4096])?;
        }
        Ok(())
    })?;
    Ok(format!(
        "ms per MiB: preadv into mapped grants {t_grants:.2}, preadv into own pages {t_own:.2}, grant copy {t_copy:.2}, volatile copy into mapped grants {t_volatile:.2}"
    ))
}

fn bail(msg: impl Into<String>) -> Box<dyn std::error::Error> {
    msg.into().into()
}

fn main() {
    let mut p = Probe { failed: 0, passed: 0 };

    for (lib, r) in libxc_ffi::libraries() {
        p.check(&format!("load {lib}"), || r.map(|()| "loaded".to_string()).map_err(bail));
    }

    // ---- xenctrl
    let xc = XenCtrl::open();
    p.check("xenctrl open", || xc.as_ref().map(|_| "ok".into()).map_err(|e| bail(e.to_string())));
    if let Ok(xc) = &xc {
        p.check("xenctrl list_domains", || {
            let doms = xc.list_domains()?;
            for d in &doms {
                println!(
                    "      dom {:>5}  {}  {:>8} pages  {} vcpus  {:.1}s  {}",
                    d.domid,
                    d.state_string(),
                    d.tot_pages,
                    d.nr_online_vcpus,
                    d.cpu_time_ns as f64 / 1e9,
                    d.uuid_string()
                );
            }
            if !doms.iter().any(|d| d.domid == 0) {
                return Err(bail("domain 0 missing from the list"));
            }
            Ok(format!("{} domain(s)", doms.len()))
        });
        p.check("xenctrl domain_info(0)", || {
            let d = xc.domain_info(0)?;
            Ok(format!("state {} hvm={} shutdown={:?}", d.state_string(), d.hvm, d.shutdown))
        });
        p.check("xenctrl domain_info(32000) is NoSuchDomain", || match xc.domain_info(32000) {
            Err(e) if e.is_not_found() => Ok(e.to_string()),
            other => Err(bail(format!("unexpected {other:?}"))),
        });
    }

    // ---- xenstore
    let xs = XenStore::open();
    p.check("xenstore open", || xs.as_ref().map(|_| "ok".into()).map_err(|e| bail(e.to_string())));
    if let Ok(xs) = &xs {
        p.check("xenstore read /local/domain/0/name", || Ok(format!("{:?}", xs.read_string("/local/domain/0/name")?)));
        p.check("xenstore get_domain_path(0)", || Ok(xs.get_domain_path(0)?));
        p.check("xenstore directory /local/domain", || Ok(format!("{:?}", xs.directory("/local/domain")?)));
        let base = "/tool/xensnap-probe";
        p.check("xenstore write/read/permissions/rm", || {
            xs.write_str(&format!("{base}/k"), "v1")?;
            let v = xs.read_string(&format!("{base}/k"))?;
            if v != "v1" {
                return Err(bail(format!("read back {v:?}")));
            }
            let perms = xs.get_permissions(base)?;
            xs.set_permissions(base, &perms)?;
            xs.rm(base)?;
            if xs.read_opt(&format!("{base}/k"))?.is_some() {
                return Err(bail("node survived rm"));
            }
            Ok(format!("perms {perms:?}"))
        });
        p.check("xenstore transaction", || {
            let n = xs.transaction(|t| {
                t.write_str(&format!("{base}/a"), "1")?;
                t.write_str(&format!("{base}/b"), "2")?;
                Ok(t.directory(base)?.len())
            })?;
            let b = xs.read_string(&format!("{base}/b"))?;
            xs.rm(base)?;
            Ok(format!("{n} children inside, b={b:?} after commit"))
        });
        p.check("xenstore watch", || {
            xs.mkdir(base)?;
            xs.watch(base, "probe-token")?;
            let first = xs.wait_watch(Some(Duration::from_secs(2)))?.ok_or_else(|| bail("no initial event"))?;
            xs.write_str(&format!("{base}/x"), "y")?;
            let mut seen = None;
            for _ in 0..10 {
                match xs.wait_watch(Some(Duration::from_secs(2)))? {
                    Some(ev) if ev.path.ends_with("/x") => {
                        seen = Some(ev);
                        break;
                    }
                    Some(_) => continue,
                    None => break,
                }
            }
            xs.unwatch(base, "probe-token")?;
            xs.rm(base)?;
            let ev = seen.ok_or_else(|| bail("no event for the write"))?;
            Ok(format!("initial {first:?}, then {ev:?}"))
        });
    }

    // ---- event channels: a loopback channel inside dom0
    let ev = Evtchn::open();
    p.check("evtchn open", || ev.as_ref().map(|_| "ok".into()).map_err(|e| bail(e.to_string())));
    if let Ok(ev) = &ev {
        p.check("evtchn loopback notify/wait/unmask", || {
            let a = ev.bind_unbound_port(0)?;
            let b = ev.bind_interdomain(0, a.local_port())?;
            // Xen marks the local port of a fresh interdomain binding pending (the kernel's
            // evtchn driver then reports it once): drain such initial events before the check,
            // else the first wait returns b's port instead of a's.
            let mut drained = Vec::new();
            while let Some(p) = ev.wait(Some(Duration::from_millis(200)))? {
                ev.unmask(p)?;
                drained.push(p);
                if drained.len() > 8 {
                    return Err(bail(format!("events keep arriving before notify: {drained:?}")));
                }
            }
            b.notify()?;
            let got = ev.wait(Some(Duration::from_secs(2)))?.ok_or_else(|| bail("no event within 2s"))?;
            if got != a.local_port() {
                return Err(bail(format!("event on port {got}, expected {}", a.local_port())));
            }
            ev.unmask(got)?;
            a.notify()?;
            let back = ev.wait(Some(Duration::from_secs(2)))?.ok_or_else(|| bail("no reverse event"))?;
            ev.unmask(back)?;
            Ok(format!("ports {} <-> {} (initial events drained: {drained:?})", a.local_port(), b.local_port()))
        });
    }

    // ---- grants: dom0 grants pages to itself, maps and copies them
    let gt = Gnttab::open();
    p.check("gnttab open", || gt.as_ref().map(|_| "ok".into()).map_err(|e| bail(e.to_string())));
    let shr = GntShr::open();
    p.check("gntshr open", || shr.as_ref().map(|_| "ok".into()).map_err(|e| bail(e.to_string())));
    if let (Ok(gt), Ok(shr)) = (&gt, &shr) {
        p.check("gnttab set_max_grants(256)", || gt.set_max_grants(256).map(|()| "ok".into()).map_err(Into::into));
        p.check("gnttab self-grant map + ring atomics", || {
            let pages = shr.share_pages(0, 2, true)?;
            pages.write_bytes(100, b"hello from gntalloc")?;
            pages.store_u32_release(4096, 0x1234_5678)?;
            let map = gt.map_grant_refs(0, pages.refs(), Prot::ReadWrite)?;
            let mut buf = [0u8; 19];
            map.read_bytes(100, &mut buf)?;
            if &buf != b"hello from gntalloc" {
                return Err(bail(format!("mapped bytes {buf:?}")));
            }
            if map.load_u32_acquire(4096)? != 0x1234_5678 {
                return Err(bail("u32 on page 2 differs"));
            }
            map.store_u32_release(8, 77)?;
            if pages.load_u32_acquire(8)? != 77 {
                return Err(bail("write through mapping not visible"));
            }
            let ro = gt.map_grant_ref(0, pages.refs()[0], Prot::Read)?;
            if ro.write_bytes(0, &[1]).is_ok() {
                return Err(bail("read-only mapping accepted a write"));
            }
            Ok(format!("refs {:?}", pages.refs()))
        });
        p.check("gnttab grant copy both directions", || {
            let pages = shr.share_pages(0, 1, true)?;
            pages.write_bytes(512, &[0xab; 512])?;
            let mut into = vec![0u8; 512];
            let data = vec![0xcd; 1024];
            let gref = pages.refs()[0];
            let mut segs = [
                CopySegment::FromGuest { src: ForeignPage { domid: 0, gref, offset: 512 }, dst: &mut into },
                CopySegment::ToGuest { src: &data, dst: ForeignPage { domid: 0, gref, offset: 2048 } },
            ];
            let st = gt.grant_copy(&mut segs)?;
            if !st.iter().all(|s| s.is_ok()) {
                return Err(bail(format!("statuses {st:?}")));
            }
            let mut check = vec![0u8; 1024];
            pages.read_bytes(2048, &mut check)?;
            if into != vec![0xab; 512] || check != data {
                return Err(bail("copied bytes differ"));
            }
            Ok("512 B from, 1024 B to".into())
        });
        p.check("gnttab scatter/gather copy_to_guest + copy_from_guest", || {
            let pages = shr.share_pages(0, 2, true)?;
            let r = pages.refs();
            let segs = [
                SgSeg { gref: r[0], offset: 3584, len: 512 },
                SgSeg { gref: r[1], offset: 0, len: 4096 },
                SgSeg { gref: r[0], offset: 0, len: 512 },
            ];
            let out: Vec<u8> = (0..5120u32).map(|i| (i % 251) as u8).collect();
            let st = gt.copy_to_guest(0, &segs, &out)?;
            let mut back = vec![0u8; 5120];
            let st2 = gt.copy_from_guest(0, &segs, &mut back)?;
            if !st.iter().chain(&st2).all(|s| s.is_ok()) {
                return Err(bail(format!("statuses {st:?} {st2:?}")));
            }
            if back != out {
                return Err(bail("round trip differs"));
            }
            let mut first = [0u8; 512];
            pages.read_bytes(0, &mut first)?;
            if first[..] != out[4608..] {
                return Err(bail("third segment not at page 0 offset 0"));
            }
            Ok("5120 B over 3 segments".into())
        });
        p.check("gnttab copy into a read-only grant fails per segment", || {
            let ro = shr.share_pages(0, 1, false)?;
            let st = gt.copy_to_guest(0, &[SgSeg { gref: ro.refs()[0], offset: 0, len: 8 }], &[1u8; 8])?;
            if st[0].is_ok() {
                return Err(bail("wrote into a read-only grant"));
            }
            let mut b = [0u8; 8];
            let st2 = gt.copy_from_guest(0, &[SgSeg { gref: ro.refs()[0], offset: 0, len: 8 }], &mut b)?;
            Ok(format!("write: {}, read: {}", st[0], st2[0]))
        });
        p.check("gnttab copy from a bad gref fails per segment", || {
            let mut buf = [0u8; 16];
            let st = gt.copy_from_guest(0, &[SgSeg { gref: 0x7fff_fff0, offset: 0, len: 16 }], &mut buf)?;
            if st[0].is_ok() {
                return Err(bail("bogus gref copied"));
            }
            Ok(st[0].to_string())
        });
        p.check("copy costs, 1 MiB = 256 pages, best of 8", || copy_costs(shr));
    }

    println!("summary: {} checks ok, {} checks failed", p.passed, p.failed);
    std::process::exit(p.failed.min(125) as i32);
}
