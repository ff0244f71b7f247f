//! A global allocator for test binaries that count the heap: every call goes to the system
//! allocator unchanged, and a successful allocation or a free is reported to the test's hooks
//! (`alloc` with the new block's size, `free` with the old one's; a reallocation is both).
//! Shared by `mqtt_allocations.rs` (allocations per message) and `mqtt_idle_memory.rs` (live heap
//! per idle connection); each test binary installs its own with `#[global_allocator]`.

use std::alloc::{GlobalAlloc, Layout, System};

pub struct Hooked {
    /// Called after a successful allocation (also the new block of a reallocation).
    pub alloc: fn(usize),
    /// Called before a block is freed (also the old block of a successful reallocation).
    pub free: fn(usize),
}

// SAFETY: every call goes to `System` with the caller's arguments; the hooks are the test's
// counters, which touch only atomics and const-initialised thread locals (they never allocate).
unsafe impl GlobalAlloc for Hooked {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            (self.alloc)(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            (self.alloc)(layout.size());
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            (self.free)(layout.size());
            (self.alloc)(new_size);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        (self.free)(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}
