//! Accept loops (TCP, Unix), connection threads and stopping.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing::{debug, error, info, info_span, warn};

use crate::conn;
use crate::error::NbdError;
use crate::registry::ExportRegistry;

/// Default cap on simultaneous connections per [`Server`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default time a client accepted by `serve_tcp` / `serve_unix` may take between two reads
/// during the handshake (none once in transmission).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an accept loop sleeps between polls when it cannot be woken by a self-connect
/// (a Unix listener without a path).
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A way to interrupt a blocking `accept` from another thread.
enum Waker {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// An accepted socket. Also used as a second handle on a connection's socket, to shut it
/// down on stop or to lift the handshake timeout.
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }
    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.flush(),
            Sock::Unix(s) => s.flush(),
        }
    }
}

/// Shared between a [`Server`], its clones, its [`StopHandle`]s and its connection threads.
#[derive(Default)]
pub(crate) struct StopState {
    stopped: AtomicBool,
    next_id: AtomicU64,
    wakers: Mutex<Vec<(u64, Waker)>>,
    conns: Mutex<HashMap<u64, Sock>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The protected maps stay consistent even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StopState {
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        info!("stopping NBD server");
        for c in lock(&self.conns).values() {
            c.shutdown();
        }
        // Wake every accept loop with a throw-away connection; it sees the flag and returns.
        let wakers: Vec<Waker> = lock(&self.wakers)
            .iter()
            .map(|(_, w)| match w {
                Waker::Tcp(a) => Waker::Tcp(*a),
                Waker::Unix(p) => Waker::Unix(p.clone()),
            })
            .collect();
        for w in wakers {
            let r = match &w {
                Waker::Tcp(a) => TcpStream::connect_timeout(a, Duration::from_secs(2)).map(drop),
                Waker::Unix(p) => UnixStream::connect(p).map(drop),
            };
            if let Err(e) = r {
                debug!(error = %e, "could not wake an accept loop (it may have exited)");
            }
        }
    }

    fn add_waker(&self, w: Waker) -> u64 {
        let id = self.id();
        lock(&self.wakers).push((id, w));
        id
    }

    fn remove_waker(&self, id: u64) {
        lock(&self.wakers).retain(|(i, _)| *i != id);
    }
}

/// Stops the accept loops of a [`Server`] (and all its clones) from another thread, and
/// shuts down the sockets of connections they accepted. A stopped server stays stopped.
#[derive(Clone)]
pub struct StopHandle {
    state: Arc<StopState>,
}

impl StopHandle {
    /// Stop accepting, disconnect the clients of `serve_tcp` / `serve_unix`, and make those
    /// calls return (after their connection threads finished). Connections run through
    /// [`Server::handle_connection`] directly get `ESHUTDOWN` on their next request. Idempotent.
    pub fn stop(&self) {
        self.state.stop();
    }

    pub fn is_stopped(&self) -> bool {
        self.state.is_stopped()
    }
}

/// An NBD server (fixed newstyle negotiation, simple replies) over an [`ExportRegistry`].
/// Cheap to clone; clones share the registry, the connection count and the stop state.
#[derive(Clone)]
pub struct Server {
    registry: Arc<dyn ExportRegistry>,
    stop: Arc<StopState>,
    max_connections: usize,
    handshake_timeout: Option<Duration>,
    active: Arc<AtomicUsize>,
}

/// Decrements the connection count and forgets the closer when a connection thread ends,
/// even by panic.
struct ConnGuard {
    id: u64,
    stop: Arc<StopState>,
    active: Arc<AtomicUsize>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.stop.conns).remove(&self.id);
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Server {
    pub fn new(registry: Arc<dyn ExportRegistry>) -> Self {
        Server {
            registry,
            stop: Arc::new(StopState::default()),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Cap on simultaneous connections accepted by `serve_tcp` / `serve_unix` (together);
    /// connections beyond it are closed at once. Default [`DEFAULT_MAX_CONNECTIONS`].
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// Read timeout during the handshake of connections accepted by `serve_tcp` /
    /// `serve_unix` (so idle clients cannot hold connection slots); `None` disables it.
    /// Default [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub fn with_handshake_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    pub fn registry(&self) -> &Arc<dyn ExportRegistry> {
        &self.registry
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle { state: Arc::clone(&self.stop) }
    }

    /// Connections currently being served by the accept loops.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Serve one client on `stream` until it disconnects (`Ok`) or breaks the protocol or
    /// the transport (`Err`; the caller should drop the stream). Blocking.
    pub fn handle_connection<S: Read + Write>(&self, stream: S) -> Result<(), NbdError> {
        let mut stream = stream;
        conn::serve(&mut stream, &*self.registry, &self.stop, &mut || {})
    }

    /// Accept TCP clients, one thread each, until [`StopHandle::stop`] (then `Ok`, after the
    /// connection threads ended) or an accept error (then `Err`; connection threads are left
    /// running detached).
    pub fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        let mut addr = listener.local_addr()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        info!(%addr, "NBD server listening on TCP");
        let waker = self.stop.add_waker(Waker::Tcp(addr));
        let res = self.accept_loop(
            || {
                let (s, peer) = listener.accept()?;
                if let Err(e) = s.set_nodelay(true) {
                    debug!(error = %e, "TCP_NODELAY failed");
                }
                Ok((Sock::Tcp(s), peer.to_string()))
            },
            false,
        );
        self.stop.remove_waker(waker);
        res
    }

    /// Accept clients on a Unix socket, one thread each; same contract as
    /// [`Server::serve_tcp`].
    pub fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        let local = listener.local_addr()?;
        let path = local.as_pathname().map(|p| p.to_path_buf());
        info!(path = ?path, "NBD server listening on a Unix socket");
        // Without a path there is nothing to connect to for a wake-up: poll instead.
        let polling = path.is_none();
        if polling {
            listener.set_nonblocking(true)?;
        }
        let waker = path.map(|p| self.stop.add_waker(Waker::Unix(p)));
        let res = self.accept_loop(
            || {
                let (s, _) = listener.accept()?;
                s.set_nonblocking(false)?;
                Ok((Sock::Unix(s), "unix".to_string()))
            },
            polling,
        );
        if let Some(w) = waker {
            self.stop.remove_waker(w);
        }
        res
    }

    fn accept_loop<F>(&self, mut accept: F, polling: bool) -> io::Result<()>
    where
        F: FnMut() -> io::Result<(Sock, String)>,
    {
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let result = loop {
            if self.stop.is_stopped() {
                break Ok(());
            }
            let (stream, peer) = match accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && polling => {
                    thread::sleep(POLL_INTERVAL);
                    continue;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    continue
                }
                // EMFILE / ENFILE / ENOBUFS / ENOMEM: transient resource exhaustion.
                Err(e) if matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12)) => {
                    warn!(error = %e, "accept failed, retrying");
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(e) => {
                    error!(error = %e, "accept failed, NBD accept loop exits");
                    break Err(e);
                }
            };
            if self.stop.is_stopped() {
                break Ok(());
            }
            threads.retain(|t| !t.is_finished());
            if self.active.load(Ordering::SeqCst) >= self.max_connections {
                warn!(%peer, max = self.max_connections, "too many NBD connections, refusing");
                continue;
            }
            if let Err(e) = stream.set_read_timeout(self.handshake_timeout) {
                warn!(%peer, error = %e, "cannot set the handshake timeout, refusing");
                continue;
            }
            // Handles on the same socket: one for stop() to shut it down, one to lift the
            // handshake timeout once in transmission.
            let (closer, untimer) = match (stream.try_clone(), stream.try_clone()) {
                (Ok(c), Ok(u)) => (c, u),
                (Err(e), _) | (_, Err(e)) => {
                    warn!(%peer, error = %e, "cannot duplicate the socket, refusing");
                    continue;
                }
            };
            let id = self.stop.id();
            lock(&self.stop.conns).insert(id, closer);
            self.active.fetch_add(1, Ordering::SeqCst);
            let guard = ConnGuard { id, stop: Arc::clone(&self.stop), active: Arc::clone(&self.active) };
            // A stop() that ran between our flag check and the insert above missed this
            // connection: close it ourselves.
            if self.stop.is_stopped() {
                drop(guard);
                break Ok(());
            }
            let server = self.clone();
            let spawned = thread::Builder::new().name(format!("nbd-conn-{id}")).spawn(move || {
                let _guard = guard;
                let span = info_span!("nbd_conn", id, %peer);
                let _enter = span.enter();
                info!("client connected");
                let mut stream = stream;
                let mut untime = || {
                    if let Err(e) = untimer.set_read_timeout(None) {
                        warn!(error = %e, "cannot clear the handshake timeout");
                    }
                };
                match conn::serve(&mut stream, &*server.registry, &server.stop, &mut untime) {
                    Ok(()) => info!("client disconnected"),
                    Err(NbdError::Shutdown) => info!("connection closed: server stopping"),
                    Err(NbdError::Io(e)) if server.stop.is_stopped() => {
                        debug!(error = %e, "connection closed by stop")
                    }
                    Err(e) => warn!(error = %e, "connection dropped"),
                }
            });
            match spawned {
                Ok(t) => threads.push(t),
                // The closure (and with it the guard) was dropped: the count is restored.
                Err(e) => error!(error = %e, "could not spawn a connection thread"),
            }
        };
        if result.is_ok() {
            for t in threads {
                if t.join().is_err() {
                    error!("an NBD connection thread panicked");
                }
            }
        }
        result
    }
}
