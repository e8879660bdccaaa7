#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
// `unsafe` only in the kernels' fast paths: `kernels::arm` (DSP instructions
// through `asm!`) and the AVX2 multiversions (calls after run-time detection).
#![deny(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "alloc")]
pub mod build;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod expert;
pub mod format;
#[cfg(feature = "std")]
pub mod host;
pub mod kernels;
pub mod model;
pub mod moe;
pub mod quant;
pub mod router;
pub mod scratch;

pub use error::{Error, Result, What};
pub use expert::Expert;
pub use model::{Model, argmax};
pub use moe::{MoeLayer, QMoeLayer, Stats};
pub use router::{Choice, Router, Rule, Selection};
