//! Enables the Arm DSP kernels (`SMLAD`) on targets that have the DSP
//! extension: Cortex-M4 and M7 (`thumbv7em-*`). Stable Rust cannot test
//! `target_feature = "dsp"`, so the target name decides.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(micromoe_dsp)");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.starts_with("thumbv7em") {
        println!("cargo::rustc-cfg=micromoe_dsp");
    }
    println!("cargo::rerun-if-changed=build.rs");
}
