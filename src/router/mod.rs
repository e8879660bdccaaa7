//! Gating: logits -> scores -> top-k -> weights.
//!
//! One [`Rule`] describes the routing of every supported family:
//!
//! | family | rule |
//! |---|---|
//! | Switch Transformer | [`Rule::switch`]: softmax over all experts, top-1, weight = its probability |
//! | GLaM, Mixtral | [`Rule::mixtral`]: top-k, softmax over the k chosen (renormalized) |
//! | Qwen2-MoE | [`Rule::qwen2_moe`]: softmax over all, top-k, renormalized only if `norm_topk_prob` |
//! | DeepSeek-V3 | [`Rule::deepseek_v3`]: sigmoid scores, selection bias, group-limited top-k, `routed_scaling_factor` |
//!
//! [`Router`] routes f32 logits; [`IntRouter`] routes fixed-point logits with
//! integer arithmetic only (no float, no libm) and gives Q15 weights, so every
//! target picks the same experts with the same weights.
//!
//! **Ties**: among equal keys the lower expert index wins, always.
//!
//! **NaN and infinity** in f32 logits: NaN ranks as -infinity, and every
//! logit is clamped to `±f32::MAX / 4` before scoring, so weights are always
//! finite and never NaN. (A layer refuses non-finite *inputs* before they
//! reach the router; these rules matter when `route` is called directly.)
//!
//! ```
//! use micromoe::router::{Router, Rule, Selection};
//! let router = Router::new(Rule::mixtral(4, 2), None, 1.0).unwrap();
//! let mut sel = Selection::new();
//! router.route(&[0.5, 2.0, -1.0, 2.0], &mut sel).unwrap();
//! assert_eq!((sel[0].expert, sel[1].expert), (1, 3)); // tie: lower index first
//! assert!((sel[0].weight - 0.5).abs() < 1e-6);
//! ```

#[cfg(feature = "alloc")]
mod dispatch;
mod fixed;
mod select;

#[cfg(feature = "alloc")]
pub use dispatch::{DispatchPlan, Group};
pub use fixed::{ONE_Q30, exp_neg_q30, exp2_neg_q30, sigmoid_q30};
pub use select::MAX_GROUPS;

use crate::error::{Error, Result, What, check_len};

/// Most experts a token can be sent to.
pub const MAX_K: usize = 8;

/// Fractional bits of the integer router's logits: a logit `l` stands for
/// `l / 2^LOGIT_FRAC_BITS`.
pub const LOGIT_FRAC_BITS: u32 = 12;

/// 1.0 as an integer router weight (weights are Q15, but may reach 1.0 and,
/// with a scaling factor, more).
pub const ONE_Q15: i32 = 1 << 15;

/// One chosen expert and its weight.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Choice<W> {
    /// Expert index.
    pub expert: u16,
    /// Weight of its output: f32, or Q15 (`i32`, [`ONE_Q15`] = 1.0).
    pub weight: W,
}

/// The experts a token goes to, in router order (best first).
pub type Selection<W> = heapless::Vec<Choice<W>, MAX_K>;

/// How logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Scoring {
    /// Softmax over all experts.
    Softmax,
    /// Independent sigmoid per expert.
    Sigmoid,
}

/// Group-limited routing: experts are split into `count` equal groups and
/// only the `keep` best groups (by the sum of their two best scores) compete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Groups {
    /// Number of groups (`n_group`).
    pub count: usize,
    /// Groups kept per token (`topk_group`).
    pub keep: usize,
}

/// What a router does, independent of its numeric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Rule {
    /// Number of experts.
    pub experts: usize,
    /// Experts chosen per token, `1..=MAX_K`.
    pub k: usize,
    /// Softmax or sigmoid.
    pub scoring: Scoring,
    /// Renormalize the chosen weights to sum to 1 (for softmax this is the
    /// softmax over the chosen logits).
    pub normalize: bool,
    /// Group-limited routing, if any.
    pub groups: Option<Groups>,
}

impl Rule {
    /// Switch Transformer: top-1 of a softmax over all experts.
    pub const fn switch(experts: usize) -> Rule {
        Rule { experts, k: 1, scoring: Scoring::Softmax, normalize: false, groups: None }
    }

    /// GLaM / Mixtral: top-k, softmax over the chosen.
    pub const fn mixtral(experts: usize, k: usize) -> Rule {
        Rule { experts, k, scoring: Scoring::Softmax, normalize: true, groups: None }
    }

    /// Qwen2-MoE: softmax over all, top-k, renormalized if `norm_topk_prob`.
    pub const fn qwen2_moe(experts: usize, k: usize, norm_topk_prob: bool) -> Rule {
        Rule { experts, k, scoring: Scoring::Softmax, normalize: norm_topk_prob, groups: None }
    }

    /// DeepSeek-V3: sigmoid scores, `n_group` groups of which `topk_group`
    /// compete, renormalized if `norm_topk_prob`. Pass the selection bias
    /// (`e_score_correction_bias`) and `routed_scaling_factor` to the router.
    pub const fn deepseek_v3(
        experts: usize,
        k: usize,
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
    ) -> Rule {
        let groups = if n_group > 1 { Some(Groups { count: n_group, keep: topk_group }) } else { None };
        Rule { experts, k, scoring: Scoring::Sigmoid, normalize: norm_topk_prob, groups }
    }

    /// Checks k, the expert count and the groups.
    pub fn validate(&self) -> Result<()> {
        let Rule { experts, k, .. } = *self;
        if experts == 0 || experts > u16::MAX as usize {
            return Err(Error::OutOfRange { what: What::Experts, index: 0 });
        }
        if k == 0 || k > MAX_K || k > experts {
            return Err(Error::TopK { k, experts });
        }
        if let Some(Groups { count, keep }) = self.groups {
            let bad = Error::Groups { groups: count, topk_group: keep, experts };
            if count == 0 || count > MAX_GROUPS || !experts.is_multiple_of(count) || keep == 0 || keep > count
            {
                return Err(bad);
            }
            if keep * (experts / count) < k {
                return Err(bad);
            }
        }
        Ok(())
    }

    fn group_size(&self) -> usize {
        self.groups.map_or(self.experts, |g| self.experts / g.count.max(1))
    }
}

/// Keeps f32 logits finite and ordered: NaN -> the smallest value.
fn sanitize(l: f32) -> f32 {
    const LIM: f32 = f32::MAX / 4.0;
    if l.is_nan() { -LIM } else { l.clamp(-LIM, LIM) }
}

/// `1 / (1 + e^-l)` in f32: routing scores and shared-expert gates on the
/// float path (the GPU's host side too), one formula for the same bits.
pub(crate) fn sigmoid(l: f32) -> f32 {
    1.0 / (1.0 + libm::expf(-l))
}

/// A router over f32 logits.
#[derive(Debug, Clone, Copy)]
pub struct Router<'a> {
    rule: Rule,
    bias: Option<&'a [f32]>,
    scaling: f32,
}

impl<'a> Router<'a> {
    /// `bias`: one finite value per expert, added to scores for choosing
    /// only (DeepSeek's `e_score_correction_bias`); `scaling`: finite factor
    /// applied to the final weights (`routed_scaling_factor`, 1.0 for none).
    pub fn new(rule: Rule, bias: Option<&'a [f32]>, scaling: f32) -> Result<Self> {
        rule.validate()?;
        if let Some(b) = bias {
            check_len(What::SelectionBias, rule.experts, b.len())?;
            crate::error::check_finite(What::SelectionBias, b)?;
        }
        if !scaling.is_finite() {
            return Err(Error::NonFinite { what: What::Scaling, index: 0 });
        }
        Ok(Router { rule, bias, scaling })
    }

    /// The routing rule.
    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    /// The selection bias, if any.
    pub fn bias(&self) -> Option<&'a [f32]> {
        self.bias
    }

    /// The factor applied to the final weights.
    pub fn scaling(&self) -> f32 {
        self.scaling
    }

    /// Chooses experts for one token from its `logits` (one per expert).
    pub fn route(&self, logits: &[f32], sel: &mut Selection<f32>) -> Result<()> {
        let rule = &self.rule;
        check_len(What::Logits, rule.experts, logits.len())?;
        // `get`: indices are below `experts` (checked above), and no
        // indexing means no panic path for the linker to find.
        let l = |e: usize| sanitize(logits.get(e).copied().unwrap_or(f32::NAN));
        let bias = |e: usize| self.bias.and_then(|b| b.get(e)).copied().unwrap_or(0.0);
        let max = (0..rule.experts).map(l).fold(f32::MIN, f32::max);
        let sum: f32 = match rule.scoring {
            Scoring::Softmax => (0..rule.experts).map(|e| libm::expf(l(e) - max)).sum(),
            Scoring::Sigmoid => 1.0,
        };
        let score = |e: usize| match rule.scoring {
            Scoring::Softmax => libm::expf(l(e) - max) / sum,
            Scoring::Sigmoid => sigmoid(l(e)),
        };
        let mask = select::kept_groups(rule.experts, rule.groups, |e| score(e) + bias(e));
        // Without a bias, softmax ranks as the logits do, at full resolution.
        let best = if rule.scoring == Scoring::Softmax && self.bias.is_none() {
            select::top_k(rule.experts, rule.k, rule.group_size(), mask, l)
        } else {
            select::top_k(rule.experts, rule.k, rule.group_size(), mask, |e| score(e) + bias(e))
        };
        sel.clear();
        let top = best.first().map_or(0.0, |&(e, _)| l(e));
        for &(e, _) in &best {
            let w = match (rule.scoring, rule.normalize) {
                // Softmax over the chosen: exp relative to the best of them.
                (Scoring::Softmax, true) => libm::expf(l(e) - top),
                _ => score(e),
            };
            // Cannot fail: best.len() <= k <= MAX_K.
            let _ = sel.push(Choice { expert: e as u16, weight: w });
        }
        if rule.normalize {
            let total: f32 = sel.iter().map(|c| c.weight).sum::<f32>() + 1e-20;
            sel.iter_mut().for_each(|c| c.weight /= total);
        }
        if self.scaling != 1.0 {
            sel.iter_mut().for_each(|c| c.weight *= self.scaling);
        }
        Ok(())
    }
}

/// A router over fixed-point logits (`LOGIT_FRAC_BITS` fractional bits),
/// integer arithmetic only; weights are Q15 ([`ONE_Q15`] = 1.0).
///
/// Softmax weights are `round(2^15 e_i / sum e_j)` with `e` from
/// [`exp_neg_q30`]; sigmoid scores are [`sigmoid_q30`]. The selection bias is
/// in Q15 score units, the scaling factor Q15.
#[derive(Debug, Clone, Copy)]
pub struct IntRouter<'a> {
    rule: Rule,
    bias: Option<&'a [i32]>,
    scaling_q15: i32,
}

impl<'a> IntRouter<'a> {
    /// As [`Router::new`], with the bias and scaling factor in Q15.
    pub fn new(rule: Rule, bias: Option<&'a [i32]>, scaling_q15: i32) -> Result<Self> {
        rule.validate()?;
        if let Some(b) = bias {
            check_len(What::SelectionBias, rule.experts, b.len())?;
        }
        if !(0..=(1 << 20)).contains(&scaling_q15) {
            return Err(Error::OutOfRange { what: What::Scaling, index: 0 });
        }
        Ok(IntRouter { rule, bias, scaling_q15 })
    }

    /// The routing rule.
    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    /// Chooses experts for one token from its fixed-point `logits`.
    pub fn route(&self, logits: &[i32], sel: &mut Selection<i32>) -> Result<()> {
        let rule = &self.rule;
        check_len(What::Logits, rule.experts, logits.len())?;
        let l = |e: usize| logits.get(e).copied().unwrap_or(i32::MIN);
        let exp_rel = |e: usize, max: i32| exp_neg_q30((max as i64 - l(e) as i64) as u64, LOGIT_FRAC_BITS);
        let max = (0..rule.experts).map(l).max().unwrap_or(0);
        // Score in Q30 (softmax: relative to the largest logit, unnormalized;
        // the common factor does not change ranks) plus bias.
        let key = |e: usize| -> i64 {
            let s = match rule.scoring {
                Scoring::Softmax => exp_rel(e, max),
                Scoring::Sigmoid => sigmoid_q30(l(e), LOGIT_FRAC_BITS),
            };
            s as i64 + ((self.bias.and_then(|b| b.get(e)).copied().unwrap_or(0) as i64) << 15)
        };
        let mask = select::kept_groups(rule.experts, rule.groups, key);
        let best = if rule.scoring == Scoring::Softmax && self.bias.is_none() {
            select::top_k(rule.experts, rule.k, rule.group_size(), mask, |e| l(e) as i64)
        } else {
            select::top_k(rule.experts, rule.k, rule.group_size(), mask, key)
        };
        let top = best.first().map_or(0, |&(e, _)| l(e));
        // Unnormalized Q30 values of the chosen and the denominator.
        let value = |e: usize| -> u64 {
            match (rule.scoring, rule.normalize) {
                (Scoring::Softmax, true) => exp_rel(e, top) as u64,
                (Scoring::Softmax, false) => exp_rel(e, max) as u64,
                (Scoring::Sigmoid, _) => sigmoid_q30(l(e), LOGIT_FRAC_BITS) as u64,
            }
        };
        let den: u64 = match (rule.scoring, rule.normalize) {
            (_, true) => best.iter().map(|&(e, _)| value(e)).sum(),
            (Scoring::Softmax, false) => (0..rule.experts).map(|e| exp_rel(e, max) as u64).sum(),
            (Scoring::Sigmoid, false) => 1 << 30,
        };
        sel.clear();
        for &(e, _) in &best {
            let w = fixed::div_u64((value(e) << 15) + den / 2, den);
            let w = ((w * self.scaling_q15 as u64 + (1 << 14)) >> 15) as i32;
            // Cannot fail: best.len() <= k <= MAX_K.
            let _ = sel.push(Choice { expert: e as u16, weight: w });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
