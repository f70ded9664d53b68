//! The global allocator: the system's `malloc`, except for small over-aligned blocks.
//!
//! tokio aligns every task and every I/O registration to 128 bytes (its cache-line padding on
//! x86_64 and aarch64), so each client connection asks for two 256-byte blocks aligned to 128.
//! glibc serves those with `posix_memalign`, which cuts an aligned chunk out of a larger one
//! and leaves the pieces before and after it as small free chunks that later requests rarely
//! fit: with 10,000 idle clients that slack was 220 of each client's 1,465 bytes
//! (benches/README.md, "Morning of 2026-12-07").
//! Here such blocks (alignment 32 to 128, at most 512 bytes) come from 64 KiB slabs of their
//! own, one free list per 128-byte size class, with no header and no slack; everything else
//! goes to `malloc` unchanged.
//!
//! Hand-written (about 80 lines) because the allocator crates replace `malloc` as a whole:
//! measured here, jemalloc made a fresh sluice 1.6 MiB larger and 10,000 idle clients cost
//! as much in total, mimalloc made it 12 MiB larger (benches/README.md). Slabs are kept for
//! reuse, not returned to the system, as glibc keeps most freed small chunks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::Mutex;

/// The granularity and the largest alignment served from slabs.
const GRAIN: usize = 128;
/// Size classes: 128, 256, 384 and 512 bytes.
const CLASSES: usize = 4;
/// Bytes taken from `malloc` at a time for one class.
const SLAB: usize = 64 * 1024;

/// The slab allocator for small over-aligned blocks, `malloc` for the rest.
pub struct Allocator;

/// One size class: a list of freed blocks, then the unused rest of its current slab.
struct Class {
    free: *mut Free,
    next: *mut u8,
    end: *mut u8,
}

/// A freed block, linked through its first bytes.
struct Free {
    next: *mut Free,
}

struct Classes([Class; CLASSES]);

// SAFETY: the pointers are owned by the allocator and only touched under the mutex.
unsafe impl Send for Classes {}

const EMPTY: Class = Class {
    free: ptr::null_mut(),
    next: ptr::null_mut(),
    end: ptr::null_mut(),
};

static SLABS: Mutex<Classes> = Mutex::new(Classes([EMPTY; CLASSES]));

/// The class of a block served from slabs, if this layout is one.
fn class_of(l: Layout) -> Option<usize> {
    (l.align() > 16 && l.align() <= GRAIN && l.size() <= CLASSES * GRAIN)
        .then(|| l.size().max(1).div_ceil(GRAIN) - 1)
}

impl Allocator {
    fn take(class: usize) -> *mut u8 {
        let mut slabs = SLABS.lock().unwrap_or_else(|e| e.into_inner());
        let c = &mut slabs.0[class];
        if !c.free.is_null() {
            let block = c.free;
            // SAFETY: a block on the free list is a freed block of this class, linked by `give`.
            c.free = unsafe { (*block).next };
            return block.cast();
        }
        let size = (class + 1) * GRAIN;
        if c.next.is_null() || (c.end as usize) - (c.next as usize) < size {
            // SAFETY: a non-zero size and a valid power-of-two alignment.
            let slab = unsafe { System.alloc(Layout::from_size_align_unchecked(SLAB, GRAIN)) };
            if slab.is_null() {
                return slab;
            }
            c.next = slab;
            // SAFETY: one past the end of the slab just allocated.
            c.end = unsafe { slab.add(SLAB) };
        }
        let block = c.next;
        // SAFETY: `size` bytes fit before `end` (checked above).
        c.next = unsafe { block.add(size) };
        block
    }

    /// # Safety
    /// `block` came from `take(class)` and is no longer used.
    unsafe fn give(block: *mut u8, class: usize) {
        let mut slabs = SLABS.lock().unwrap_or_else(|e| e.into_inner());
        let c = &mut slabs.0[class];
        let block = block.cast::<Free>();
        // SAFETY: the block is ours again, at least 128 bytes and aligned for `Free`.
        unsafe { block.write(Free { next: c.free }) };
        c.free = block;
    }
}

// SAFETY: slab blocks are aligned to 128 bytes (slabs are, and sizes are multiples of 128),
// at least as large as asked, and handed out once until freed; the rest is `System`'s.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        match class_of(l) {
            Some(c) => Self::take(c),
            // SAFETY: the caller's contract, passed on.
            None => unsafe { System.alloc(l) },
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        match class_of(l) {
            Some(c) => {
                let p = Self::take(c);
                if !p.is_null() {
                    // SAFETY: `p` holds at least `l.size()` bytes.
                    unsafe { p.write_bytes(0, l.size()) };
                }
                p
            }
            // SAFETY: the caller's contract, passed on.
            None => unsafe { System.alloc_zeroed(l) },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        match class_of(l) {
            // SAFETY: the same layout chose the same class when `p` was allocated.
            Some(c) => unsafe { Self::give(p, c) },
            // SAFETY: the caller's contract, passed on.
            None => unsafe { System.dealloc(p, l) },
        }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for `new_size` with `l`'s alignment.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, l.align()) };
        if class_of(l).is_none() && class_of(new).is_none() {
            // SAFETY: the caller's contract, passed on.
            return unsafe { System.realloc(p, l, new_size) };
        }
        // SAFETY: as `alloc` and `dealloc`; the copy stays within both blocks.
        unsafe {
            let q = self.alloc(new);
            if !q.is_null() {
                ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                self.dealloc(p, l);
            }
            q
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_aligned_blocks_come_aligned_from_their_class_and_are_reused() {
        let a = Allocator;
        let l = Layout::from_size_align(256, 128).unwrap();
        let blocks: Vec<_> = (0..600).map(|_| unsafe { a.alloc(l) }).collect();
        for &b in &blocks {
            assert!(!b.is_null());
            assert_eq!(b as usize % 128, 0);
        }
        let mut sorted = blocks.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), blocks.len(), "a block handed out twice");
        for w in sorted.windows(2) {
            assert!(w[1] as usize - w[0] as usize >= 256, "blocks overlap");
        }
        let last = *blocks.last().unwrap();
        unsafe { a.dealloc(last, l) };
        assert_eq!(unsafe { a.alloc(l) }, last, "a freed block is reused first");
        for b in blocks {
            unsafe { a.dealloc(b, l) };
        }
    }

    #[test]
    fn threads_allocating_at_once_never_share_a_block() {
        let l = Layout::from_size_align(384, 128).unwrap();
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                std::thread::spawn(move || {
                    let a = Allocator;
                    let mut held = Vec::new();
                    for round in 0..2_000usize {
                        let p = unsafe { a.alloc(l) };
                        assert!(!p.is_null());
                        unsafe { p.write_bytes(t, 384) };
                        held.push(p as usize);
                        if round % 3 == 0 {
                            let q = held.swap_remove(round % held.len()) as *mut u8;
                            assert!((0..384).all(|i| unsafe { *q.add(i) } == t), "a block was shared");
                            unsafe { a.dealloc(q, l) };
                        }
                    }
                    for q in held {
                        let q = q as *mut u8;
                        assert!((0..384).all(|i| unsafe { *q.add(i) } == t), "a block was shared");
                        unsafe { a.dealloc(q, l) };
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn other_layouts_and_growth_out_of_a_class_keep_their_bytes() {
        assert_eq!(class_of(Layout::from_size_align(256, 8).unwrap()), None);
        assert_eq!(class_of(Layout::from_size_align(1024, 128).unwrap()), None);
        assert_eq!(class_of(Layout::from_size_align(1, 64).unwrap()), Some(0));
        assert_eq!(class_of(Layout::from_size_align(512, 128).unwrap()), Some(3));
        let a = Allocator;
        let l = Layout::from_size_align(200, 64).unwrap();
        unsafe {
            let p = a.alloc_zeroed(l);
            assert!((0..200).all(|i| *p.add(i) == 0));
            for i in 0..200 {
                *p.add(i) = i as u8;
            }
            let q = a.realloc(p, l, 2000);
            assert_eq!(q as usize % 64, 0);
            assert!((0..200).all(|i| *q.add(i) == i as u8));
            a.dealloc(q, Layout::from_size_align(2000, 64).unwrap());
        }
    }
}
