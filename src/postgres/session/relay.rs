//! The relay loop of a logged-in session: waits for whatever comes next (client bytes, the
//! backend's replies, a reclaimed parked backend, a node marked down, the idle timeout) in one
//! small future, and writes to the client and the backend.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;
use tracing::info;

use super::{fatal, End, Link, Session, BACKEND_BACKLOG};
use crate::common::buffers::Buffer;

/// What one step of backend I/O did.
pub(super) enum BackendIo {
    /// Some of the pending bytes went to the server.
    Wrote,
    /// Bytes read from the server (0: it closed the connection).
    Read(usize),
}

/// Writes pending bytes to the backend and reads its replies, whichever is ready first
/// (writing first: it usually completes at once). With `read_on`, a write that sent
/// everything goes on to the read in the same poll (the usual request, written whole, needs no
/// round through the relay loop); without it, as when the client's reading waits for the
/// backlog to shrink, the write is reported so that the relay looks at the client again.
fn poll_backend_io(
    stream: &mut crate::common::tls::BackendStream,
    rbuf: &mut BytesMut,
    pending: &mut Buffer,
    read_on: bool,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<BackendIo>> {
    if !pending.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, &pending[..]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                pending.get().advance(n);
                pending.release();
                if !(read_on && pending.is_empty()) {
                    return Poll::Ready(Ok(BackendIo::Wrote));
                }
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
    }
    tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, rbuf).map_ok(BackendIo::Read)
}

/// What the relay acts on next.
pub(super) enum Event {
    /// The attached backend's connection wrote or read.
    Backend(std::io::Result<BackendIo>),
    /// The parked backend's pool wants it back.
    Reclaimed,
    /// The node of the request in flight was marked down (why).
    NodeDown(String),
    /// The client was idle past `client_idle_timeout`.
    IdleTimeout,
    /// Bytes read from the client (0: it closed the connection).
    Client(std::io::Result<usize>),
}

/// Whether the client has idled past `client_idle_timeout` (never without the timer).
fn poll_idle_out(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>, cx: &mut Context<'_>) -> Poll<()> {
    match timer {
        Some(t) => t.as_mut().poll(cx),
        None => Poll::Pending,
    }
}

/// Why `node` is marked down in the topology now (its last error), if it is.
fn down_now(topology: &crate::common::topology::Topology, node: &str) -> Option<String> {
    let snap = topology.load();
    let n = snap.nodes.iter().find(|n| *n.address == *node && !n.health.up)?;
    Some(n.health.error.clone().unwrap_or_default())
}

impl Session {
    /// Relays until the session ends. Not an `async fn`: an async fn keeps its arguments
    /// twice in its state machine, and this one is part of every client's task.
    #[allow(clippy::manual_async_fn)]
    pub(super) fn relay(&mut self) -> impl Future<Output = End> + Send + '_ {
        async move {
            let end = loop {
                self.end_transaction_if_done();
                if let Err(end) = self.process_client_messages().await {
                    break end;
                }
                self.cbuf.release();
                if self.flush_client().await.is_err() {
                    return End::ClientGone;
                }
                let event = self.next_event().await;
                if let Some(end) = self.on_event(event) {
                    break end;
                }
            };
            // The error that ends the session goes out before the backend is let go.
            let _ = self.flush_client().await;
            end
        }
    }

    /// Acts on one event; `Some` ends the session (with what the client should be told in
    /// `out`).
    fn on_event(&mut self, event: Event) -> Option<End> {
        match event {
            Event::Backend(Ok(BackendIo::Wrote)) => None,
            Event::Backend(Ok(BackendIo::Read(0))) => {
                Some(self.backend_lost("the server closed the connection"))
            }
            Event::Backend(Err(e)) => Some(self.backend_lost(&e.to_string())),
            Event::Backend(Ok(BackendIo::Read(_))) => {
                // The node answers: a probe it leaves unanswered meanwhile found it slow, not dead.
                if let Some(a) = self.link.attached() {
                    a.checkout.conn.note_progress();
                }
                self.process_backend_messages().err()
            }
            // Another client needs a connection of that pool, or it idled out.
            Event::Reclaimed => {
                self.release_parked();
                None
            }
            Event::NodeDown(why) => Some(self.backend_lost(&format!("the node was marked down ({why})"))),
            Event::IdleTimeout => {
                info!(parent: &self.span(), "client idle past client_idle_timeout; disconnecting");
                fatal(
                    self.out.get(),
                    "57P05",
                    "terminating connection due to idle-session timeout",
                );
                Some(End::ClientGone)
            }
            Event::Client(Ok(0) | Err(_)) => Some(End::ClientGone),
            Event::Client(Ok(n)) => {
                self.db
                    .totals
                    .received
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                None
            }
        }
    }

    /// Waits for what the relay acts on next. One small future whatever the state: each state
    /// awaits only what can happen in it, in one `match`, so their futures share storage (this
    /// future is part of every idle client's task).
    ///
    /// An `async fn` on purpose: as a function returning an `async move` block, everything it
    /// polls would be captured for the whole wait instead of moved into the one closure that
    /// polls it (56 B more).
    pub(super) async fn next_event(&mut self) -> Event {
        // A request in flight on a node that sluice has marked down (probe timeout, refused
        // connections) would wait as long as the node hangs: end it instead.
        let in_flight = self
            .link
            .attached()
            .is_some_and(|a| !a.st.units.is_empty() || a.st.in_batch || a.st.copy_in);
        // A client with no backend is between transactions: it may idle only so long. The
        // timer is made once per session (only when the limit is configured) and restarted here.
        if let (Some(limit), false) = (
            self.cluster.pg.client_idle_timeout,
            self.link.attached().is_some(),
        ) {
            let deadline = tokio::time::Instant::now() + limit;
            match &mut self.idle_timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.idle_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let Session {
            stream,
            cbuf,
            link,
            to_backend,
            rare,
            cluster,
            idle_timer,
            ..
        } = self;
        // A held message waits for the backend's replies: the client's next ones wait in its
        // socket meanwhile.
        let held = rare.as_ref().is_some_and(|r| r.held.is_some());
        // Past this much unsent to the backend, the client waits too (TCP backpressure), as
        // it would on a direct connection to a server that is slow to read.
        let backlogged = move |to_backend: &Buffer| held || to_backend.len() >= BACKEND_BACKLOG;
        let mut client = move |cx: &mut Context<'_>, backlogged: bool| {
            if backlogged {
                return Poll::Pending;
            }
            cbuf.poll_read_from(stream, cx).map(Event::Client)
        };
        // What the session's server connection may do, polled first: an attached backend reads
        // the replies while the client's messages are written to it (a server blocked on
        // sending replies stops reading, so a proxy that only wrote would deadlock on a long
        // pipeline, and an error would reach the client only after it had sent everything:
        // asyncpg's executemany stops early on a server error); a parked one may be reclaimed
        // by its pool; a client without a backend may idle out. While a backend streams
        // without pause, client messages wait in the socket; they are read as soon as it
        // pauses. Hand-polled per state, so that only the waits of one state take room in
        // this future (it is part of every idle client's task).
        match link {
            Link::Attached(a) => {
                let (stream, rbuf, drained, node) = a.checkout.conn.relay_parts();
                if !in_flight {
                    // The closures take what they use (`move`): nothing they borrow stays
                    // behind as a separate local in this future.
                    return poll_fn(move |cx| {
                        let wait = backlogged(to_backend);
                        if let Poll::Ready(r) = poll_backend_io(stream, rbuf, to_backend, !wait, cx) {
                            return Poll::Ready(Event::Backend(r));
                        }
                        client(cx, wait)
                    })
                    .await;
                }
                // A request in flight ends when its node is marked down. Marking a node down
                // drains its pools, which wakes this wait (`Drained`); once its pool has been
                // drained (also for another reason: a demoted node, RECONNECT), every wake-up
                // looks at the topology, and the request goes on unless its node is down.
                let topology = &cluster.topology;
                poll_fn(move |cx| {
                    let wait = backlogged(to_backend);
                    if let Poll::Ready(r) = poll_backend_io(stream, rbuf, to_backend, !wait, cx) {
                        return Poll::Ready(Event::Backend(r));
                    }
                    if drained.poll(cx).is_ready() {
                        if let Some(why) = down_now(topology, node) {
                            return Poll::Ready(Event::NodeDown(why));
                        }
                    }
                    client(cx, wait)
                })
                .await
            }
            Link::Parked(c) => {
                to_backend.clear();
                let conn = &c.conn;
                poll_fn(move |cx| {
                    if conn.poll_reclaimed(cx).is_ready() {
                        return Poll::Ready(Event::Reclaimed);
                    }
                    if poll_idle_out(idle_timer, cx).is_ready() {
                        return Poll::Ready(Event::IdleTimeout);
                    }
                    client(cx, held)
                })
                .await
            }
            Link::Idle | Link::FailedUntilSync => {
                to_backend.clear();
                poll_fn(move |cx| {
                    if poll_idle_out(idle_timer, cx).is_ready() {
                        return Poll::Ready(Event::IdleTimeout);
                    }
                    client(cx, held)
                })
                .await
            }
        }
    }

    /// Writes `out` to the client. A client slow to read must not keep a parked backend from
    /// others: while writing, the parked backend still goes back when its pool needs it.
    ///
    /// Not an `async fn`: it would keep `self` twice.
    #[allow(clippy::manual_async_fn)]
    pub(super) fn flush_client(&mut self) -> impl Future<Output = std::io::Result<()>> + Send + '_ {
        self.db
            .totals
            .sent
            .fetch_add(self.out.len() as u64, std::sync::atomic::Ordering::Relaxed);
        async move {
            while !self.out.is_empty() {
                let Session {
                    stream, out, link, ..
                } = self;
                // The write first: it usually completes at once, and then the parked backend is
                // not even looked at.
                let written = poll_fn(|cx| {
                    if let Poll::Ready(r) = Pin::new(&mut *stream).poll_write(cx, &out[..]) {
                        return Poll::Ready(Some(r));
                    }
                    match link {
                        Link::Parked(c) if c.conn.poll_reclaimed(cx).is_ready() => Poll::Ready(None),
                        _ => Poll::Pending,
                    }
                })
                .await;
                match written {
                    Some(n) => match n? {
                        0 => return Err(std::io::ErrorKind::WriteZero.into()),
                        n => out.get().advance(n),
                    },
                    None => self.release_parked(),
                }
            }
            self.out.release();
            Ok(())
        }
    }
}
