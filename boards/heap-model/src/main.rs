//! A model that arrives at run time: the int8 digits model is copied from a
//! flash region into a heap buffer (embedded-alloc, micromoe's `alloc`
//! feature), validated and run; then a copy with one corrupted byte is
//! refused with its error, and the firmware carries on. Exits 0 only if the
//! good copy matches the host and the bad one is refused.
#![no_std]
#![no_main]

extern crate alloc;

use core::mem::MaybeUninit;

use cortex_m as _; // links its single-core critical section, which the heap needs
use cortex_m_rt::entry;
use embedded_alloc::LlffHeap as Heap;
use micromoe::Model;
use micromoe::format::write::AlignedBytes;
use micromoe_board_common::{INT8_MODEL, INT8_VECTORS, SCRATCH_BYTES, check};
use semihosting::println;

#[global_allocator]
static HEAP: Heap = Heap::empty();

const HEAP_BYTES: usize = 48 * 1024;

#[entry]
fn main() -> ! {
    static mut HEAP_MEMORY: [MaybeUninit<u8>; HEAP_BYTES] = [MaybeUninit::uninit(); HEAP_BYTES];
    // SAFETY: `#[entry]` turns this `static mut` into a `&'static mut` that
    // only `main` holds, and `main` runs once, before any allocation.
    unsafe { HEAP.init(HEAP_MEMORY.as_mut_ptr() as usize, HEAP_BYTES) };

    // "Receive" the model: copy it from its flash region into the heap.
    let received = AlignedBytes::from(INT8_MODEL);
    let mut scratch = [0u8; SCRATCH_BYTES];
    let good = check("heap-model", "int8", &received, INT8_VECTORS, true, &mut scratch);

    // A transfer error: one byte changed on the way.
    let mut damaged = alloc::vec::Vec::from(INT8_MODEL);
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    let damaged = AlignedBytes::from(&damaged[..]);
    let refused = match Model::parse(&damaged) {
        Ok(_) => {
            println!("heap-model: a corrupted model was accepted: FAIL");
            false
        }
        Err(e) => {
            println!("heap-model: corrupted copy refused ({}); still running: ok", e);
            true
        }
    };
    let pass = good && refused;
    println!("heap-model: {}", if pass { "PASS" } else { "FAIL" });
    semihosting::process::exit(if pass { 0 } else { 1 })
}
