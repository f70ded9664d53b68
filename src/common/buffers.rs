//! I/O buffers lent per thread: a connection holds a buffer only while bytes are in it.
//!
//! Most clients of a proxy are idle most of the time. A buffer of its own per connection and
//! direction would make every idle client cost kilobytes; instead a [`Buffer`] takes one from
//! its thread's pool when data arrives and gives it back once the bytes are relayed, so idle
//! connections hold none and busy ones reuse the same few allocations without calling the
//! allocator.
//!
//! Hand-written (about 60 lines) rather than a pool crate: the pools on crates.io share one
//! locked list between threads or hand out their own guard types, where this needs `BytesMut`
//! (whose `reserve` reclaims a buffer in place once the frames split off it are gone) and one
//! list per thread, which stays correct when each core runs its own runtime.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::AsyncRead;

/// The size of a lent buffer: the bytes one read asks the socket for.
pub const BUFFER_SIZE: usize = 8 * 1024;
/// Buffers that grew larger than this (a large message) go back to the allocator.
const KEEP_UP_TO: usize = 64 * 1024;
/// Buffers a thread keeps for reuse (128 KiB): enough for the clients whose data one thread
/// relays at once; more were in use together only in a burst, and go back to the allocator.
const POOLED_PER_THREAD: usize = 16;

thread_local! {
    #[allow(clippy::vec_box)]
    static POOL: RefCell<Vec<Box<BytesMut>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer of at least [`BUFFER_SIZE`] bytes, from the thread's pool if it has one.
fn take() -> Box<BytesMut> {
    let mut b = POOL
        .try_with(|p| p.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default();
    // Reclaims the whole allocation when nothing else refers to it any more (no allocation);
    // allocates when the pool was empty or the buffer is still shared with a frame in use.
    b.reserve(BUFFER_SIZE);
    b
}

/// Gives an emptied buffer back to the thread's pool (or frees it).
fn give(mut b: Box<BytesMut>) {
    b.clear();
    if b.capacity() > KEEP_UP_TO {
        return;
    }
    // Not during the thread's exit (its pool is gone): the buffer is freed.
    let _ = POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOLED_PER_THREAD {
            p.push(b);
        }
    });
}

/// A byte buffer that holds memory only while it holds bytes.
///
/// One pointer: the `BytesMut` lives in a box that goes to and from the pool with it, so an
/// idle connection's three buffers take 24 bytes of its session instead of 96.
#[derive(Default)]
pub struct Buffer(Option<Box<BytesMut>>);

impl Buffer {
    /// The buffer, for writing into it: one is taken from the pool if none is held.
    pub fn get(&mut self) -> &mut BytesMut {
        self.0.get_or_insert_with(take)
    }

    /// Gives the buffer back if it is empty.
    pub fn release(&mut self) {
        if self.0.as_ref().is_some_and(|b| b.is_empty()) {
            give(self.0.take().expect("checked"));
        }
    }

    /// Drops the bytes and gives the buffer back.
    pub fn clear(&mut self) {
        if let Some(b) = self.0.take() {
            give(b);
        }
    }

    /// Whether a buffer is held (for tests and accounting).
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }

    /// Reads from `io` into the buffer; while nothing arrives, no buffer is held.
    pub fn poll_read_from<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        let r = tokio_util::io::poll_read_buf(Pin::new(io), cx, self.get());
        if r.is_pending() {
            self.release();
        }
        r
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], |b| &b[..])
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    #[test]
    fn a_buffer_is_held_only_while_it_has_bytes_and_is_reused() {
        let mut b = Buffer::default();
        assert!(!b.is_held());
        b.get().extend_from_slice(b"hello");
        let ptr = b.as_ptr();
        assert_eq!(&b[..], b"hello");
        b.release();
        assert!(b.is_held(), "not empty: kept");
        b.get().advance(5);
        b.release();
        assert!(!b.is_held());
        // The same allocation comes back from this thread's pool.
        let mut c = Buffer::default();
        assert!(c.get().capacity() >= BUFFER_SIZE);
        assert_eq!(c.get().as_ptr(), ptr);
    }

    #[tokio::test]
    async fn a_reader_holds_a_buffer_only_while_bytes_arrive() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(64);
        let mut b = Buffer::default();
        // Nothing to read: pending, and no buffer held meanwhile.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(b.poll_read_from(&mut server, &mut cx).is_pending());
        assert!(!b.is_held());
        client.write_all(b"abc").await.unwrap();
        let n = std::future::poll_fn(|cx| b.poll_read_from(&mut server, cx))
            .await
            .unwrap();
        assert_eq!((n, &b[..]), (3, &b"abc"[..]));
        b.get().advance(3);
        b.release();
        assert!(!b.is_held());
    }

    #[test]
    fn a_buffer_shared_with_a_frame_is_not_reused_while_the_frame_lives() {
        let mut b = Buffer::default();
        b.get().extend_from_slice(b"frame");
        let frame = b.get().split_to(5).freeze();
        b.release();
        let mut c = Buffer::default();
        c.get().extend_from_slice(b"other");
        assert_eq!(&frame[..], b"frame", "the frame's bytes are untouched");
    }
}
