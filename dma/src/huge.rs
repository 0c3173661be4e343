//! DMA buffers on transparent huge pages.
//!
//! glommio allocates the buffer of every O_DIRECT read that does not fit its io_uring memory
//! (most do not: a fetch reads 1 MiB, the memory is 1 MiB), and that memory itself, through
//! the global allocator with a 4 KiB alignment. From the heap those are 4 KiB pages scattered
//! in physical memory, and the kernel hands a disk one scatter-gather entry per page: a 1 MiB
//! read is 256 entries, more than the 254 this machine's virtio disk takes in one request, so
//! it goes out as two, and the host walks every entry. In alternating rounds, fio's 1028 KiB
//! reads (two jobs, two reads in flight each) read 2.2-2.4 GB/s into buffers on huge pages
//! and 0.9-1.6 GB/s into heap buffers (bench/RESULTS.md, sixth session). [`DmaAllocator`] is
//! a global allocator that gives such allocations whole, aligned 2 MiB blocks advised
//! `MADV_HUGEPAGE`: when the kernel backs them with huge pages, each is physically
//! contiguous, one entry per page. Freed ones are kept for reuse, up to [`FREE_BYTES_MAX`],
//! so a read does not fault and zero fresh memory each time. Everything else goes to the
//! system allocator.
//!
//! The costs: an allocation of 512 KiB takes a whole 2 MiB block, resident once touched; the
//! first fault in a fresh block may wait for the kernel to compact memory (with the default
//! `defrag` setting `madvise`). The memory pinned for io_uring is the same: a non-root daemon
//! with 2 shards pinned 6144 KiB (VmPin) before and after, the io memory on huge pages
//! (AnonHugePages 4096 KiB). Where the kernel has transparent huge pages off
//! (`/sys/kernel/mm/transparent_hugepage/enabled` set to `never`), the blocks are ordinary
//! pages and reads are as slow as from the heap; the daemon's start-up summary says which.

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

impl FreeBlocks {
    /// Takes out the block at `index`, keeping the others in the order they were freed.
    fn take(&mut self, index: usize) -> (usize, usize) {
        let block = self.blocks[index];
        self.blocks.copy_within(index + 1..self.len, index);
        self.len -= 1;
        self.bytes -= block.1;
        block
    }

    /// Adds a block as the newest; the caller made room.
    fn push(&mut self, block: (usize, usize)) {
        self.blocks[self.len] = block;
        self.len += 1;
        self.bytes += block.1;
    }
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
/// freed one of that length, or a new mapping (zeroed by the kernel: the second field).
unsafe fn block(len: usize) -> (*mut u8, bool) {
    {
        let mut free = free_blocks();
        let count = free.len;
        if let Some(i) = free.blocks[..count].iter().position(|&(_, l)| l == len) {
            return (free.take(i).0 as *mut u8, false);
        }
    }
    let Some(mapped) = len.checked_add(HUGE_PAGE_BYTES) else { return (ptr::null_mut(), false) };
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
        return (ptr::null_mut(), false);
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
    (start as *mut u8, true)
}

/// Gives a block back to the free list, which drops its oldest blocks to make room (so
/// blocks of an unusual length, from a large fetch, do not hold it for good); a block larger
/// than the whole list is unmapped.
unsafe fn release(address: *mut u8, len: usize) {
    let mut dropped = [(0usize, 0usize); FREE_SLOTS];
    let mut dropped_count = 0;
    if len <= FREE_BYTES_MAX {
        let mut free = free_blocks();
        while free.len == FREE_SLOTS || free.bytes + len > FREE_BYTES_MAX {
            dropped[dropped_count] = free.take(0);
            dropped_count += 1;
        }
        free.push((address as usize, len));
    } else {
        dropped[0] = (address as usize, len);
        dropped_count = 1;
    }
    for &(address, len) in &dropped[..dropped_count] {
        // SAFETY: blocks this allocator mapped, no longer used by anyone.
        unsafe { libc::munmap(address as *mut libc::c_void, len) };
    }
}

// SAFETY: DMA-sized blocks are whole mappings (or reused ones) of at least the asked size,
// aligned to 2 MiB (a multiple of DMA_ALIGN), given out to one owner at a time; everything
// else is System's.
unsafe impl GlobalAlloc for DmaAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_dma(layout.size(), layout.align()) {
            unsafe { block(block_len(layout.size())).0 }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_dma(layout.size(), layout.align()) {
            let (address, fresh) = unsafe { block(block_len(layout.size())) };
            if !address.is_null() && !fresh {
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

    fn free_list() -> (usize, usize) {
        let free = free_blocks();
        (free.len, free.bytes)
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
            assert_eq!(free_list(), (1, HUGE_PAGE_BYTES));
            // Another DMA read of the same block length gets the freed block, as it was.
            let again = a.alloc(dma(1 << 20));
            assert_eq!(again, first);
            assert_eq!(*again.add(HUGE_PAGE_BYTES - 1), 0xab);
            assert_eq!(free_list(), (0, 0));
            // alloc_zeroed zeroes a reused block.
            a.dealloc(again, dma(1 << 20));
            let zeroed = a.alloc_zeroed(dma(1 << 20));
            assert_eq!(zeroed, first);
            assert!(std::slice::from_raw_parts(zeroed, 1 << 20).iter().all(|&b| b == 0));
            a.dealloc(zeroed, dma(1 << 20));
        }
    }

    #[test]
    fn other_allocations_are_the_system_allocators() {
        let _alone = alone();
        let a = DmaAllocator;
        unsafe {
            // Large but not page aligned (a Vec), or page aligned but small: neither is a DMA
            // buffer, so neither ends in the free list.
            for layout in [Layout::from_size_align(4 << 20, 16).unwrap(), dma(256 << 10)] {
                let p = a.alloc(layout);
                assert!(!p.is_null());
                p.write_bytes(1, layout.size());
                a.dealloc(p, layout);
                assert_eq!(free_list(), (0, 0), "{layout:?}");
            }
        }
    }

    #[test]
    fn reallocs_keep_their_bytes_and_their_block_while_it_fits() {
        let _alone = alone();
        let a = DmaAllocator;
        let pattern = |i: usize| (i % 251) as u8;
        unsafe {
            let small = dma(64 << 10);
            let p = a.alloc(small);
            assert!(!p.is_null());
            for i in 0..small.size() {
                *p.add(i) = pattern(i);
            }
            // Into a DMA block: moved, bytes kept.
            let grown = a.realloc(p, small, 1 << 20);
            assert!(!grown.is_null());
            assert_eq!(grown as usize % HUGE_PAGE_BYTES, 0);
            assert!((0..small.size()).all(|i| *grown.add(i) == pattern(i)));
            // Within the same 2 MiB block: in place.
            assert_eq!(a.realloc(grown, dma(1 << 20), (3 << 20) / 2), grown);
            // Past it: a 4 MiB block, bytes kept, the old block freed for reuse.
            let big = a.realloc(grown, dma((3 << 20) / 2), 3 << 20);
            assert!(!big.is_null() && big != grown);
            assert!((0..small.size()).all(|i| *big.add(i) == pattern(i)));
            assert_eq!(free_list(), (1, HUGE_PAGE_BYTES));
            // Back below the threshold: the system's again, bytes kept, the block freed.
            let shrunk = a.realloc(big, dma(3 << 20), 32 << 10);
            assert!(!shrunk.is_null());
            assert!((0..(32 << 10)).all(|i| *shrunk.add(i) == pattern(i)));
            assert_eq!(free_list(), (2, HUGE_PAGE_BYTES + (4 << 20)));
            a.dealloc(shrunk, dma(32 << 10));
        }
    }

    #[test]
    fn the_free_list_keeps_the_newest_blocks_up_to_its_bound() {
        let _alone = alone();
        let a = DmaAllocator;
        unsafe {
            // A large fetch's 6 MiB block first, then more 2 MiB blocks than the list holds.
            let odd = a.alloc(dma(5 << 20));
            let blocks: Vec<*mut u8> = (0..FREE_SLOTS + 3).map(|_| a.alloc(dma(1 << 20))).collect();
            assert!(!odd.is_null() && blocks.iter().all(|b| !b.is_null()));
            a.dealloc(odd, dma(5 << 20));
            for &b in &blocks {
                a.dealloc(b, dma(1 << 20));
            }
            // The odd block went first; the list holds the last blocks freed.
            assert_eq!(free_list(), (FREE_SLOTS, FREE_BYTES_MAX));
            let kept: Vec<usize> = free_blocks().blocks.iter().map(|&(address, _)| address).collect();
            let newest: Vec<usize> = blocks[3..].iter().map(|&b| b as usize).collect();
            assert_eq!(kept, newest);
            // A block larger than the whole list is unmapped, and the list is unchanged.
            let huge = a.alloc(dma(FREE_BYTES_MAX + 1));
            assert!(!huge.is_null());
            a.dealloc(huge, dma(FREE_BYTES_MAX + 1));
            assert_eq!(free_list(), (FREE_SLOTS, FREE_BYTES_MAX));
        }
    }
}
