//! DMA buffers on transparent huge pages.
//!
//! glommio allocates every O_DIRECT read's buffer, and each shard's io_uring memory, through
//! the global allocator with a 4 KiB alignment. From the heap those are 4 KiB pages scattered
//! in physical memory, and the kernel hands a disk one scatter-gather entry per page: a 1 MiB
//! read is 256 entries, more than the 254 this machine's virtio disk takes in one request, so
//! it goes out as two, and the host walks every entry. In alternating rounds, fio's 1028 KiB
//! reads (two jobs, two reads in flight each) read 2.2-2.4 GB/s into buffers on huge pages
//! and 0.9-1.6 GB/s into heap buffers (bench/RESULTS.md, sixth session). [`DmaAllocator`] is a global allocator that gives
//! such allocations whole, aligned 2 MiB pages (`MADV_HUGEPAGE`): physically contiguous, one
//! entry per page. Freed ones are kept for reuse, up to [`FREE_BYTES_MAX`], so a read does
//! not fault and zero fresh memory each time. Everything else goes to the system allocator.
//!
//! Where the kernel has transparent huge pages off (`/sys/kernel/mm/transparent_hugepage/
//! enabled` set to `never`), the blocks are ordinary pages: slower reads, nothing else.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::Mutex;

/// The size and alignment of a transparent huge page on x86-64 and of the blocks given out.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;
/// The alignment glommio asks for its DMA buffers (O_DIRECT's block), which marks them.
pub const DMA_ALIGN: usize = 4096;
/// DMA allocations from this size on get huge pages: reads of a fetch's size (most ask
/// 1 MiB) and the io_uring memory. Smaller ones (header peeks, the read ahead's extensions)
/// would waste most of a 2 MiB page.
pub const DMA_HUGE_MIN_BYTES: usize = 512 << 10;
/// Free blocks kept for reuse across all threads, in bytes; past it they are unmapped.
pub const FREE_BYTES_MAX: usize = 16 << 20;
const FREE_SLOTS: usize = FREE_BYTES_MAX / HUGE_PAGE_BYTES;

/// The process's global allocator in the daemon: DMA-sized, page-aligned allocations on huge
/// pages, everything else from [`System`].
pub struct DmaAllocator;

/// Freed blocks as (address, length) pairs; a fixed array, as an allocator must not allocate.
struct FreeBlocks {
    blocks: [(usize, usize); FREE_SLOTS],
    len: usize,
    bytes: usize,
}

static FREE: Mutex<FreeBlocks> = Mutex::new(FreeBlocks { blocks: [(0, 0); FREE_SLOTS], len: 0, bytes: 0 });

fn free_blocks() -> std::sync::MutexGuard<'static, FreeBlocks> {
    // Nothing panics while holding it; a poisoned lock still holds consistent lists.
    FREE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn is_dma(size: usize, align: usize) -> bool {
    align == DMA_ALIGN && size >= DMA_HUGE_MIN_BYTES
}

fn block_len(size: usize) -> usize {
    size.next_multiple_of(HUGE_PAGE_BYTES)
}

/// A block of `len` bytes (a multiple of [`HUGE_PAGE_BYTES`]) aligned to a huge page: a
/// freed one of that length, or a new mapping.
unsafe fn block(len: usize) -> *mut u8 {
    {
        let mut free = free_blocks();
        let count = free.len;
        if let Some(i) = free.blocks[..count].iter().position(|&(_, l)| l == len) {
            let (address, _) = free.blocks[i];
            free.blocks[i] = free.blocks[count - 1];
            free.len -= 1;
            free.bytes -= len;
            return address as *mut u8;
        }
    }
    let Some(mapped) = len.checked_add(HUGE_PAGE_BYTES) else { return ptr::null_mut() };
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing.
    let raw = unsafe {
        libc::mmap(
            ptr::null_mut(),
            mapped,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return ptr::null_mut();
    }
    let raw = raw as usize;
    let start = raw.next_multiple_of(HUGE_PAGE_BYTES);
    let (head, tail) = (start - raw, HUGE_PAGE_BYTES - (start - raw));
    // SAFETY: the parts of our own mapping before and after the aligned block.
    unsafe {
        if head > 0 {
            libc::munmap(raw as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
        // Advice only: without huge pages the block still works.
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    start as *mut u8
}

/// Gives a block back: kept for reuse while the free list has room, unmapped otherwise.
unsafe fn release(address: *mut u8, len: usize) {
    {
        let mut free = free_blocks();
        if free.len < FREE_SLOTS && free.bytes + len <= FREE_BYTES_MAX {
            let count = free.len;
            free.blocks[count] = (address as usize, len);
            free.len += 1;
            free.bytes += len;
            return;
        }
    }
    // SAFETY: a block this allocator mapped, no longer used by anyone.
    unsafe { libc::munmap(address as *mut libc::c_void, len) };
}

// SAFETY: DMA-sized blocks are whole mappings (or reused ones) of at least the asked size,
// aligned to 2 MiB (a multiple of DMA_ALIGN), given out to one owner at a time; everything
// else is System's.
unsafe impl GlobalAlloc for DmaAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_dma(layout.size(), layout.align()) {
            unsafe { block(block_len(layout.size())) }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_dma(layout.size(), layout.align()) {
            let address = unsafe { self.alloc(layout) };
            if !address.is_null() {
                // SAFETY: the block is at least layout.size() bytes.
                unsafe { ptr::write_bytes(address, 0, layout.size()) };
            }
            address
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, address: *mut u8, layout: Layout) {
        if is_dma(layout.size(), layout.align()) {
            unsafe { release(address, block_len(layout.size())) }
        } else {
            unsafe { System.dealloc(address, layout) }
        }
    }

    unsafe fn realloc(&self, address: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (was, will) = (is_dma(layout.size(), layout.align()), is_dma(new_size, layout.align()));
        if !was && !will {
            return unsafe { System.realloc(address, layout, new_size) };
        }
        if was && will && block_len(layout.size()) == block_len(new_size) {
            return address;
        }
        // SAFETY: the caller guarantees new_size, rounded up to the alignment, fits an isize.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            // SAFETY: both blocks hold at least the smaller size, and are distinct.
            unsafe {
                ptr::copy_nonoverlapping(address, moved, layout.size().min(new_size));
                self.dealloc(address, layout);
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dma(size: usize) -> Layout {
        Layout::from_size_align(size, DMA_ALIGN).unwrap()
    }

    /// The free list is the process's: each test holds this and starts from an empty list.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn alone() -> std::sync::MutexGuard<'static, ()> {
        let guard = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut free = free_blocks();
        for &(address, len) in &free.blocks[..free.len] {
            unsafe { libc::munmap(address as *mut libc::c_void, len) };
        }
        (free.len, free.bytes) = (0, 0);
        guard
    }

    #[test]
    fn dma_sized_blocks_are_whole_huge_pages_and_reused() {
        let _alone = alone();
        let a = DmaAllocator;
        unsafe {
            let first = a.alloc(dma((1 << 20) + 4096));
            assert!(!first.is_null());
            assert_eq!(first as usize % HUGE_PAGE_BYTES, 0, "aligned to a huge page");
            // The whole 2 MiB block is ours to write.
            ptr::write_bytes(first, 0xab, HUGE_PAGE_BYTES);
            a.dealloc(first, dma((1 << 20) + 4096));
            // Another DMA read of the same block length gets the freed block, as it was.
            let again = a.alloc(dma(1 << 20));
            assert_eq!(again, first);
            assert_eq!(*again.add(HUGE_PAGE_BYTES - 1), 0xab);
            // alloc_zeroed zeroes even a reused block.
            a.dealloc(again, dma(1 << 20));
            let zeroed = a.alloc_zeroed(dma(1 << 20));
            assert_eq!(zeroed, first);
            assert!(std::slice::from_raw_parts(zeroed, 1 << 20).iter().all(|&b| b == 0));
            a.dealloc(zeroed, dma(1 << 20));
        }
    }

    #[test]
    fn other_allocations_and_reallocs_across_the_threshold_keep_their_bytes() {
        let _alone = alone();
        let a = DmaAllocator;
        unsafe {
            // Small, or not page aligned: the system allocator's (no 2 MiB alignment promised,
            // but a 16-byte-aligned 1 MiB Vec must not be taken for a DMA buffer).
            let plain = Layout::from_size_align(1 << 20, 16).unwrap();
            let p = a.alloc(plain);
            assert!(!p.is_null());
            a.dealloc(p, plain);
            // A page-aligned buffer grown past the threshold and back keeps its contents.
            let small = dma(64 << 10);
            let p = a.alloc(small);
            for i in 0..(64 << 10) {
                *p.add(i) = (i % 251) as u8;
            }
            let grown = a.realloc(p, small, 3 << 20);
            assert_eq!(grown as usize % HUGE_PAGE_BYTES, 0);
            assert!((0..(64 << 10)).all(|i| *grown.add(i) == (i % 251) as u8));
            let shrunk = a.realloc(grown, dma(3 << 20), 32 << 10);
            assert!((0..(32 << 10)).all(|i| *shrunk.add(i) == (i % 251) as u8));
            a.dealloc(shrunk, dma(32 << 10));
        }
    }

    #[test]
    fn the_free_list_is_bounded() {
        let _alone = alone();
        let a = DmaAllocator;
        unsafe {
            let blocks: Vec<*mut u8> = (0..FREE_SLOTS + 3).map(|_| a.alloc(dma(1 << 20))).collect();
            assert!(blocks.iter().all(|b| !b.is_null()));
            for &b in &blocks {
                a.dealloc(b, dma(1 << 20));
            }
            let free = free_blocks();
            assert_eq!(
                (free.len, free.bytes),
                (FREE_SLOTS, FREE_BYTES_MAX),
                "kept up to the bound, the rest unmapped"
            );
        }
    }
}
