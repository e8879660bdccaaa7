//! A batch's routing as a plan: tokens grouped by expert (`alloc`).
//!
//! A stable counting sort over the (token, choice) pairs of a batch: for
//! each expert, the tokens it serves in ascending order, with the slot (the
//! token's i-th choice) and weight. The CPU batched path runs each expert
//! over its group; the GPU backend uploads the same plan, so both route
//! exactly as the single-token path does.
//!
//! ```
//! use micromoe::router::{Choice, DispatchPlan, Selection};
//! let mut a = Selection::new();
//! a.push(Choice { expert: 2, weight: 0.7 }).unwrap();
//! a.push(Choice { expert: 0, weight: 0.3 }).unwrap();
//! let mut b = Selection::new();
//! b.push(Choice { expert: 2, weight: 1.0 }).unwrap();
//! let plan = DispatchPlan::new(&[a, b], 3).unwrap();
//! assert_eq!(plan.group(2).tokens, [0, 1]);
//! assert_eq!(plan.group(0).tokens, [0]);
//! assert!(plan.group(1).tokens.is_empty());
//! ```

use alloc::vec;
use alloc::vec::Vec;

use super::{Choice, Selection};
use crate::error::{Error, Result, What};

/// Tokens grouped by expert; `W` is the weight type (f32, or Q15 `i32` on
/// the integer path).
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchPlan<W = f32> {
    /// `offsets[e]..offsets[e + 1]` are expert `e`'s entries.
    pub offsets: Vec<usize>,
    /// Token of each entry.
    pub tokens: Vec<u32>,
    /// Which of the token's choices each entry is (0 = the router's first).
    pub slots: Vec<u8>,
    /// Routing weight of each entry.
    pub weights: Vec<W>,
}

/// One expert's share of a plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Group<'p, W = f32> {
    /// Tokens, ascending.
    pub tokens: &'p [u32],
    /// The choice index of each.
    pub slots: &'p [u8],
    /// The weight of each.
    pub weights: &'p [W],
}

impl<W: Copy + Default> DispatchPlan<W> {
    /// Groups the choices of `selections` (one per token) by expert.
    pub fn new(selections: &[Selection<W>], experts: usize) -> Result<Self> {
        if selections.len() > u32::MAX as usize {
            return Err(Error::Overflow);
        }
        let mut counts = vec![0usize; experts + 1];
        for sel in selections {
            for c in sel {
                let e = c.expert as usize;
                if e >= experts {
                    return Err(Error::OutOfRange { what: What::Experts, index: e });
                }
                counts[e + 1] += 1;
            }
        }
        for e in 0..experts {
            counts[e + 1] += counts[e];
        }
        let total = counts[experts];
        let (mut tokens, mut slots, mut weights) =
            (vec![0u32; total], vec![0u8; total], vec![W::default(); total]);
        let mut next = counts.clone();
        for (t, sel) in selections.iter().enumerate() {
            for (slot, &Choice { expert, weight }) in sel.iter().enumerate() {
                let at = &mut next[expert as usize];
                (tokens[*at], slots[*at], weights[*at]) = (t as u32, slot as u8, weight);
                *at += 1;
            }
        }
        Ok(DispatchPlan { offsets: counts, tokens, slots, weights })
    }

    /// Number of experts.
    pub fn experts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Expert `e`'s tokens (empty past the end).
    pub fn group(&self, e: usize) -> Group<'_, W> {
        let (a, b) = match (self.offsets.get(e), self.offsets.get(e + 1)) {
            (Some(&a), Some(&b)) => (a, b),
            _ => (0, 0),
        };
        Group { tokens: &self.tokens[a..b], slots: &self.slots[a..b], weights: &self.weights[a..b] }
    }
}
