//! Where the shared-memory tables ([`crate::kv`], [`crate::metric_table`]) get their
//! memory: a small allocator trait, so the tables are host-independent. In nginx it is the
//! zone's slab pool (under its mutex, see `shm.rs`); in unit tests a bounded heap.

use std::ptr::NonNull;

/// Alignment every block has (nginx's slab allocator gives at least this).
pub const BLOCK_ALIGN: usize = 8;

/// A source of memory blocks for the tables.
///
/// # Safety
///
/// `alloc` must return a block valid for reads and writes of `size` bytes, aligned to
/// [`BLOCK_ALIGN`], not overlapping any other live block, and reachable from every process
/// that uses the table at the same address; it stays valid until passed to `free`.
pub unsafe trait BlockAlloc {
    /// A block of `size` bytes (`size > 0`), or `None` when there is no room.
    fn alloc(&mut self, size: usize) -> Option<NonNull<u8>>;

    /// Returns a block.
    ///
    /// # Safety
    ///
    /// `block` came from this allocator's `alloc` with this `size` and is not used again.
    unsafe fn free(&mut self, block: NonNull<u8>, size: usize);
}

/// A heap allocator with a byte budget, for tests: it can run out like a full zone, and it
/// knows which blocks are live, so tests can check nothing leaks.
#[cfg(test)]
pub mod testing {
    use super::{BlockAlloc, BLOCK_ALIGN};
    use std::alloc::Layout;
    use std::collections::HashMap;
    use std::ptr::NonNull;

    /// Heap blocks, at most `budget` bytes live at once.
    pub struct HeapAlloc {
        /// Most bytes live at once.
        pub budget: usize,
        live: HashMap<usize, usize>,
        used: usize,
    }

    impl HeapAlloc {
        /// An allocator that refuses to go beyond `budget` live bytes.
        pub fn new(budget: usize) -> HeapAlloc {
            HeapAlloc {
                budget,
                live: HashMap::new(),
                used: 0,
            }
        }

        /// Bytes in live blocks.
        pub fn used(&self) -> usize {
            self.used
        }

        /// Number of live blocks.
        pub fn blocks(&self) -> usize {
            self.live.len()
        }
    }

    unsafe impl BlockAlloc for HeapAlloc {
        fn alloc(&mut self, size: usize) -> Option<NonNull<u8>> {
            assert!(size > 0, "zero-sized block");
            if self.used + size > self.budget {
                return None;
            }
            let layout = Layout::from_size_align(size, BLOCK_ALIGN).ok()?;
            // SAFETY: the layout has a non-zero size.
            let p = NonNull::new(unsafe { std::alloc::alloc(layout) })?;
            self.live.insert(p.as_ptr() as usize, size);
            self.used += size;
            Some(p)
        }

        unsafe fn free(&mut self, block: NonNull<u8>, size: usize) {
            let known = self.live.remove(&(block.as_ptr() as usize));
            assert_eq!(known, Some(size), "freeing a block with the wrong size");
            self.used -= size;
            // SAFETY: allocated above with this layout.
            std::alloc::dealloc(
                block.as_ptr(),
                Layout::from_size_align_unchecked(size, BLOCK_ALIGN),
            );
        }
    }

    impl Drop for HeapAlloc {
        fn drop(&mut self) {
            for (p, size) in self.live.drain() {
                // SAFETY: every live block was allocated with this layout.
                unsafe {
                    std::alloc::dealloc(
                        p as *mut u8,
                        Layout::from_size_align_unchecked(size, BLOCK_ALIGN),
                    )
                };
            }
        }
    }
}
