//! Enables the Arm DSP kernels (`SMLAD`) on targets that have the DSP
//! extension: Cortex-M4 and M7 (`thumbv7em-*`), and the FPU's half-precision
//! conversion (`VCVTB`) on hard-float Cortex-M targets (FPv4 of the M4F and
//! M7, FPv5 of the M33). Stable Rust cannot test `target_feature = "dsp"` or
//! `"vfp4"`, so the target name decides. Armv8-M mainline (Cortex-M33, M35P,
//! M55) has the DSP extension as an option: a firmware for a chip that has
//! it passes `-C target-feature=+dsp --cfg micromoe_dsp` (boards/mps2-an505
//! does) and gets the same kernels.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(micromoe_dsp)");
    println!("cargo::rustc-check-cfg=cfg(micromoe_fp16_convert)");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.starts_with("thumbv7em") {
        println!("cargo::rustc-cfg=micromoe_dsp");
    }
    if matches!(target.as_str(), "thumbv7em-none-eabihf" | "thumbv8m.main-none-eabihf") {
        println!("cargo::rustc-cfg=micromoe_fp16_convert");
    }
    println!("cargo::rerun-if-changed=build.rs");
}
