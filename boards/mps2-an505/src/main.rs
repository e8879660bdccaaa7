//! Runs the digits models on an emulated Cortex-M33 (Arm MPS2 AN505 under QEMU) and exits with 0 only if
//! every check against the host passes.
#![no_std]
#![no_main]

use cortex_m_rt::entry;

#[entry]
fn main() -> ! {
    unsafe extern "C" {
        /// Initial stack pointer, from the runtime's linker script.
        static _stack_start: u8;
    }
    // Only the address of the linker symbol is taken: no unsafe needed.
    let top = core::ptr::addr_of!(_stack_start) as usize;
    semihosting::process::exit(micromoe_board_common::run("mps2-an505", top))
}
