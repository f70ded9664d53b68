//! The write half of one socket (a node connection's or a client connection's), shared by
//! every task that sends on it: a producer writes into an idle socket itself, from its own
//! task, and only what cannot be written at once waits, in order, for the outbox's writer.
//!
//! Handing every frame to a writer task through a channel woke that task once per batch, on
//! both hops of a request (client reader → node writer, node reader → client writer). Here a
//! frame goes straight into the socket when nothing is queued and nobody is writing: the
//! producer takes the socket ([`Io`]) out of the lock, writes with a no-op waker (it never
//! waits for the socket), and puts it back. A partial write, a socket that would block, or
//! frames pushed while somebody writes stay queued for the writer task ([`Outbox::run`]),
//! which is woken only then and writes in batches as before. Whoever holds the socket writes
//! everything queued before what it was given, so frames leave in the order they were
//! pushed.
//!
//! A [`Cork`] (one per thread, only across code that does not wait) queues what is pushed;
//! when it ends, each outbox it touched is written once by the thread's flusher, a task
//! woken at most once per scheduler round (after the tasks already woken in that round), so
//! that the answers of the three node readers that ran in one round leave in one write to
//! their client, and the requests of every client read in that round in one write per node
//! (writing at the end of each reader's batch instead cost up to one write system call per
//! node reader and client, more CPU per request than the wake-ups it saved: benches/README.md).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use sluice_cql::codec::{Encoder, Envelope, Framing};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// What a socket is sent, in order.
pub(super) enum Out {
    Envelope(Envelope),
    /// The framing of what follows (after STARTUP: compression, v5 segments).
    Framing(Framing),
    /// Bytes sent as they are.
    Raw(Bytes),
}

impl Out {
    /// Roughly the bytes it takes once encoded (what the bound on a client's queue counts).
    fn size(&self) -> usize {
        match self {
            Out::Envelope(e) => 9 + e.body.len(),
            Out::Framing(_) => 0,
            Out::Raw(b) => b.len(),
        }
    }
}

/// The most items one write takes (the batch of the write loops before).
const BATCH: usize = 512;

/// The outbox is closed (or its socket failed): nothing more is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Closed;

/// The socket and what only its writer of the moment touches.
struct Io {
    wr: Box<dyn AsyncWrite + Send + Unpin>,
    enc: Encoder,
    /// Items taken from the queue, encoded before the write.
    items: Vec<Out>,
    /// Envelopes of `items` that share one `encode_all`.
    envelopes: Vec<Envelope>,
    /// Encoded bytes not written yet (a partial write's rest comes first).
    buf: BytesMut,
    /// What the items in `buf` count in [`State::pending`].
    taken: usize,
    /// Written but not flushed (TLS keeps records until a flush).
    flush: bool,
}

impl Io {
    /// Encodes the items taken, in order, after the bytes not written yet.
    fn encode(&mut self) {
        for item in self.items.drain(..) {
            match item {
                Out::Envelope(e) => self.envelopes.push(e),
                Out::Framing(f) => {
                    self.enc.encode_all(&self.envelopes, &mut self.buf);
                    self.envelopes.clear();
                    self.enc.set_framing(f);
                }
                Out::Raw(b) => {
                    self.enc.encode_all(&self.envelopes, &mut self.buf);
                    self.envelopes.clear();
                    self.buf.put_slice(&b);
                }
            }
        }
        self.enc.encode_all(&self.envelopes, &mut self.buf);
        self.envelopes.clear();
    }

    /// Writes and flushes `buf`; `Pending` leaves the rest in `buf`.
    fn poll_write_all(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.buf.is_empty() {
            let n = ready!(Pin::new(&mut self.wr).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.buf.advance(n);
            self.flush = true;
        }
        if self.flush {
            ready!(Pin::new(&mut self.wr).poll_flush(cx))?;
            self.flush = false;
        }
        Poll::Ready(Ok(()))
    }

    fn has_work(&self) -> bool {
        !self.buf.is_empty() || self.flush
    }
}

struct State {
    /// `None` while somebody writes (a producer or the writer task).
    io: Option<Box<Io>>,
    queue: VecDeque<Out>,
    /// Bytes pushed and not written yet (queued, or taken by the writer of the moment).
    pending: usize,
    /// Close asked for: what is queued is written, then the socket is shut down.
    closing: bool,
    /// A write failed, or the writer task ended: nothing more is accepted.
    ended: bool,
    /// The writer task, when it waits for work.
    writer: Option<Waker>,
    /// A reader waiting for `pending` to fall to the bound ([`Outbox::room`]).
    room: Option<Waker>,
}

impl State {
    /// Nobody writes and nothing written is left over: a producer may write.
    fn idle(&self) -> bool {
        self.io.as_ref().is_some_and(|io| !io.has_work())
    }
}

/// One socket's write half, shared by its producers; see the module documentation.
pub(super) struct Outbox {
    state: Mutex<State>,
    /// Above this many bytes pending, [`Outbox::room`] waits.
    bound: usize,
    /// Cancelled when the writer task has ended.
    ended: CancellationToken,
}

impl Outbox {
    /// An outbox for `wr`, whose frames `enc` encodes; [`Outbox::run`] must be spawned for it.
    /// `bound` is what [`Outbox::room`] waits for (`usize::MAX`: never waits).
    pub(super) fn new<W>(wr: W, enc: Encoder, bound: usize) -> Arc<Outbox>
    where
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let io = Box::new(Io {
            wr: Box::new(wr),
            enc,
            items: Vec::new(),
            envelopes: Vec::new(),
            buf: BytesMut::new(),
            taken: 0,
            flush: false,
        });
        Arc::new(Outbox {
            state: Mutex::new(State {
                io: Some(io),
                queue: VecDeque::new(),
                pending: 0,
                closing: false,
                ended: false,
                writer: None,
                room: None,
            }),
            bound,
            ended: CancellationToken::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `item` after everything pushed before it: written at once from the calling task
    /// when the socket is idle (or when the thread's [`Cork`] ends), else by whoever writes.
    /// Never waits.
    pub(super) fn push(self: &Arc<Self>, item: Out) -> Result<(), Closed> {
        let mut st = self.lock();
        if st.closing || st.ended {
            return Err(Closed);
        }
        st.pending += item.size();
        st.queue.push_back(item);
        // Somebody writes, or the socket is full and the writer task is on it: either
        // writes this too.
        if !st.idle() || Cork::add(self) {
            return Ok(());
        }
        self.write_now(st);
        Ok(())
    }

    /// Writes what is queued from the calling task if nobody writes (a [`Cork`]'s end).
    fn kick(&self) {
        let st = self.lock();
        if st.idle() && !st.queue.is_empty() {
            self.write_now(st);
        }
    }

    /// Takes the socket and up to [`BATCH`] queued items (the lock is held).
    fn take(st: &mut State) -> Box<Io> {
        let mut io = st.io.take().expect("taken only when idle");
        let n = st.queue.len().min(BATCH);
        for item in st.queue.drain(..n) {
            io.taken += item.size();
            io.items.push(item);
        }
        io
    }

    /// Writes what is queued without waiting for the socket, then hands over what is left.
    fn write_now(&self, mut st: MutexGuard<'_, State>) {
        if st.closing || st.ended {
            return;
        }
        let mut io = Outbox::take(&mut st);
        drop(st);
        io.encode();
        let mut cx = Context::from_waker(Waker::noop());
        let done = io.poll_write_all(&mut cx);
        // A `Pending` left the no-op waker with the socket: the writer task polls again with
        // its own before it waits.
        self.put_back(io, done);
    }

    /// Returns the socket after a write; wakes the writer task if anything is left to do,
    /// and a reader waiting for room if there is some.
    fn put_back(&self, mut io: Box<Io>, done: Poll<std::io::Result<()>>) {
        let mut st = self.lock();
        match done {
            Poll::Ready(Ok(())) => {
                st.pending -= io.taken;
                io.taken = 0;
            }
            Poll::Ready(Err(_)) => {
                st.ended = true;
                st.queue.clear();
            }
            Poll::Pending => {}
        }
        let more = io.has_work() || !st.queue.is_empty() || st.closing || st.ended;
        st.io = Some(io);
        let writer = if more { st.writer.take() } else { None };
        let room = self.room_waker(&mut st);
        drop(st);
        writer.into_iter().chain(room).for_each(Waker::wake);
    }

    fn room_waker(&self, st: &mut State) -> Option<Waker> {
        if st.pending <= self.bound || st.ended {
            st.room.take()
        } else {
            None
        }
    }

    /// Waits until no more than the bound waits to be written (or nothing will be any
    /// more): a client's reader waits here before reading more requests, so that a client
    /// that does not read its answers stops being read instead of filling memory.
    pub(super) async fn room(&self) {
        poll_fn(|cx| {
            let mut st = self.lock();
            if st.pending <= self.bound || st.ended || st.closing {
                return Poll::Ready(());
            }
            st.room = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Writes what is queued, then shuts the socket down; nothing more is accepted.
    pub(super) fn close(&self) {
        let mut st = self.lock();
        st.closing = true;
        let writer = st.writer.take();
        drop(st);
        if let Some(w) = writer {
            w.wake();
        }
    }

    /// Resolves when the writer task has ended (the socket failed or was closed).
    pub(super) async fn ended(&self) {
        self.ended.cancelled().await
    }

    /// The writer task: writes what producers could not, in batches, until the outbox is
    /// closed (and drained) or a write fails; then runs `on_end` and shuts the socket down.
    pub(super) async fn run(self: Arc<Self>, on_end: impl FnOnce()) {
        loop {
            let io = poll_fn(|cx| {
                let mut st = self.lock();
                if st.ended {
                    return Poll::Ready(None);
                }
                if let Some(io) = &st.io {
                    if io.has_work() || !st.queue.is_empty() {
                        return Poll::Ready(Some(Outbox::take(&mut st)));
                    }
                    if st.closing {
                        return Poll::Ready(None);
                    }
                }
                // Idle, or a producer writes now (it wakes this task if it leaves work).
                if !st.writer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.writer = Some(cx.waker().clone());
                }
                Poll::Pending
            })
            .await;
            let Some(mut io) = io else { break };
            io.encode();
            let done = poll_fn(|cx| io.poll_write_all(cx)).await;
            self.put_back(io, Poll::Ready(done));
        }
        let (io, room) = {
            let mut st = self.lock();
            st.ended = true;
            st.queue.clear();
            (st.io.take(), self.room_waker(&mut st))
        };
        self.ended.cancel();
        if let Some(w) = room {
            w.wake();
        }
        on_end();
        if let Some(mut io) = io {
            let _ = io.wr.shutdown().await;
        }
    }
}

/// The outboxes pushed to on this thread while a [`Cork`] is on.
struct Corked {
    on: bool,
    touched: Vec<Arc<Outbox>>,
}

thread_local! {
    static CORKED: RefCell<Corked> = const {
        RefCell::new(Corked {
            on: false,
            touched: Vec::new(),
        })
    };
}

/// While it lives, what this thread pushes is only queued; when it drops, each outbox
/// touched is written once. Hold it only across code that does not wait: another task on
/// the thread would have its pushes held too. Nested corks are one.
pub(super) struct Cork {
    outer: bool,
}

impl Cork {
    pub(super) fn new() -> Cork {
        let outer = CORKED.with(|c| {
            let mut c = c.borrow_mut();
            !std::mem::replace(&mut c.on, true)
        });
        Cork { outer }
    }

    /// Notes `outbox` for the end of the thread's cork; false if there is none.
    fn add(outbox: &Arc<Outbox>) -> bool {
        CORKED.with(|c| {
            let mut c = c.borrow_mut();
            if !c.on {
                return false;
            }
            if !c.touched.iter().any(|o| Arc::ptr_eq(o, outbox)) {
                c.touched.push(outbox.clone());
            }
            true
        })
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let touched = CORKED.with(|c| {
            let mut c = c.borrow_mut();
            c.on = false;
            if c.touched.is_empty() {
                return None;
            }
            Some(std::mem::take(&mut c.touched))
        });
        let Some(mut touched) = touched else { return };
        match Flusher::current() {
            Some(f) => f.defer(&mut touched),
            // Outside a runtime: written now.
            None => touched.drain(..).for_each(|o| o.kick()),
        }
        // Keeps the list's allocation for the next cork.
        CORKED.with(|c| {
            let mut c = c.borrow_mut();
            if c.touched.capacity() == 0 {
                c.touched = touched;
            }
        });
    }
}

/// A thread's flusher: writes the outboxes its corks touched, once per scheduler round.
struct Flusher {
    state: Mutex<FlushState>,
}

struct FlushState {
    /// Outboxes to write.
    due: Vec<Arc<Outbox>>,
    /// The flusher task, when it waits.
    waker: Option<Waker>,
    /// False once the task is gone (its runtime shut down): a new one is started.
    alive: bool,
}

thread_local! {
    static FLUSHER: RefCell<Option<Arc<Flusher>>> = const { RefCell::new(None) };
}

impl Flusher {
    fn lock(&self) -> MutexGuard<'_, FlushState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This thread's flusher (started on the current runtime if there is none yet); `None`
    /// outside a runtime.
    fn current() -> Option<Arc<Flusher>> {
        FLUSHER.with(|f| {
            let mut f = f.borrow_mut();
            if let Some(cur) = f.as_ref().filter(|cur| cur.lock().alive) {
                return Some(cur.clone());
            }
            let handle = tokio::runtime::Handle::try_current().ok()?;
            let new = Arc::new(Flusher {
                state: Mutex::new(FlushState {
                    due: Vec::new(),
                    waker: None,
                    alive: true,
                }),
            });
            handle.spawn(new.clone().run());
            *f = Some(new.clone());
            Some(new)
        })
    }

    /// Hands `touched` over (it comes back empty); wakes the task if it has nothing to do.
    fn defer(&self, touched: &mut Vec<Arc<Outbox>>) {
        let mut st = self.lock();
        let idle = st.due.is_empty();
        for o in touched.drain(..) {
            if !st.due.iter().any(|d| Arc::ptr_eq(d, &o)) {
                st.due.push(o);
            }
        }
        let waker = if idle { st.waker.take() } else { None };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The task: writes what is due whenever it is woken, for as long as its runtime runs.
    async fn run(self: Arc<Self>) {
        struct Gone(Arc<Flusher>);
        impl Drop for Gone {
            fn drop(&mut self) {
                let mut st = self.0.lock();
                st.alive = false;
                // Written now: nobody else would.
                let due = std::mem::take(&mut st.due);
                drop(st);
                due.into_iter().for_each(|o| o.kick());
            }
        }
        let _gone = Gone(self.clone());
        let mut due = Vec::new();
        poll_fn(|cx| {
            {
                let mut st = self.lock();
                std::mem::swap(&mut st.due, &mut due);
                if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.waker = Some(cx.waker().clone());
                }
            }
            for o in due.drain(..) {
                o.kick();
            }
            Poll::<()>::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use sluice_cql::frame::{Header, Opcode};
    use tokio::io::AsyncReadExt;

    use super::*;

    fn env(stream: i16, len: usize) -> Out {
        Out::Envelope(Envelope::new(
            Header::response(4, stream, Opcode::Result),
            Bytes::from(vec![stream as u8; len]),
        ))
    }

    /// Stream ids of the frames in `bytes` (uncompressed v4 frames).
    fn streams(mut bytes: &[u8]) -> Vec<i16> {
        let mut out = Vec::new();
        while bytes.len() >= 9 {
            let len = u32::from_be_bytes(bytes[5..9].try_into().unwrap()) as usize;
            out.push(i16::from_be_bytes([bytes[2], bytes[3]]));
            bytes = &bytes[9 + len..];
        }
        out
    }

    #[tokio::test]
    async fn an_idle_socket_is_written_by_the_producer_itself() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let out = Outbox::new(a, Encoder::new(), usize::MAX);
        // No writer task: only the producer can have written it.
        out.push(env(1, 10)).unwrap();
        let mut got = vec![0; 19];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(streams(&got), vec![1]);
        assert_eq!(out.lock().pending, 0);
    }

    #[tokio::test]
    async fn a_full_socket_queues_in_order_for_the_writer_and_bounds_room() {
        // A pipe of 64 bytes: the second frame's write is partial.
        let (a, mut b) = tokio::io::duplex(64);
        let out = Outbox::new(a, Encoder::new(), 100);
        let writer = tokio::spawn(out.clone().run(|| {}));
        {
            let _cork = Cork::new();
            for s in 1..=5 {
                out.push(env(s, 40)).unwrap();
            }
            // Corked: queued, not written.
            assert_eq!(out.lock().queue.len(), 5);
        }
        assert!(out.lock().pending > out.bound, "more than the bound waits");
        out.push(env(6, 40)).unwrap();
        out.close();
        assert_eq!(out.push(env(7, 1)), Err(Closed));
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(streams(&got), vec![1, 2, 3, 4, 5, 6]);
        writer.await.unwrap();
        out.room().await;
        out.ended().await;
    }

    #[tokio::test]
    async fn a_failed_write_ends_the_outbox() {
        let (a, b) = tokio::io::duplex(64);
        drop(b);
        let out = Outbox::new(a, Encoder::new(), usize::MAX);
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ended.clone();
        let writer = tokio::spawn(
            out.clone()
                .run(move || flag.store(true, std::sync::atomic::Ordering::SeqCst)),
        );
        out.push(env(1, 10)).unwrap();
        writer.await.unwrap();
        assert!(ended.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(out.push(env(2, 10)), Err(Closed));
    }
}
