//! Choosing the next token from logits: greedy, or temperature and top-p
//! (nucleus) sampling with a seeded generator, identical on every target.

use crate::error::{Error, Result, What, check_len};

/// SplitMix64 (Steele, Lea and Flood, 2014): a small, fast generator that
/// passes BigCrush; the same seed gives the same numbers everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub const fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, 24 random bits (every value an exact f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// 0 for greedy (argmax, ties to the lower id); otherwise logits are
    /// divided by it before the softmax.
    pub temperature: f32,
    /// Keep the most likely tokens whose probabilities first reach this sum
    /// (1.0 keeps all).
    pub top_p: f32,
    /// The generator.
    pub rng: Rng,
}

impl Sampler {
    /// Argmax.
    pub const fn greedy() -> Self {
        Sampler { temperature: 0.0, top_p: 1.0, rng: Rng::new(0) }
    }

    /// Temperature and top-p sampling from `seed`.
    pub const fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        Sampler { temperature, top_p, rng: Rng::new(seed) }
    }

    /// The next token. `logits` (vocabulary wide) are overwritten with
    /// probabilities when sampling; `order` is work space of the same
    /// length. Non-finite logits are an error; so is a temperature or top-p
    /// that is negative, NaN, or (top-p) above 1 or 0.
    pub fn sample(&mut self, logits: &mut [f32], order: &mut [u32]) -> Result<u32> {
        crate::error::check_finite(What::Logits, logits)?;
        if logits.is_empty() {
            return Err(Error::Shape { what: What::Logits, expected: 1, actual: 0 });
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::OutOfRange { what: What::Temperature, index: 0 });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::OutOfRange { what: What::TopP, index: 0 });
        }
        if self.temperature == 0.0 {
            // The logits are finite (the decoder checks), so there is one.
            return Ok(super::argmax(logits).unwrap_or(0) as u32);
        }
        check_len(What::Scratch, logits.len(), order.len())?;
        let max = logits.iter().fold(f32::MIN, |m, &v| m.max(v));
        let mut sum = 0.0;
        for v in logits.iter_mut() {
            *v = libm::expf((*v - max) / self.temperature);
            sum += *v;
        }
        logits.iter_mut().for_each(|v| *v /= sum);
        let u = self.rng.next_f32();
        if self.top_p >= 1.0 {
            return Ok(pick(logits, 0..logits.len() as u32, u));
        }
        // Most likely first; equal probabilities by token id: one order everywhere.
        order.iter_mut().enumerate().for_each(|(i, o)| *o = i as u32);
        let p = |t: u32| logits.get(t as usize).copied().unwrap_or(0.0);
        heap_sort(order, |a, b| p(a).total_cmp(&p(b)).then(b.cmp(&a)).is_gt());
        let mut kept = 0.0;
        let mut n = 0;
        for &t in order.iter() {
            kept += p(t);
            n += 1;
            if kept >= self.top_p {
                break;
            }
        }
        Ok(pick(logits, order.iter().take(n).copied(), u * kept))
    }
}

/// The first token of `tokens` at which the running sum of `probs` passes
/// `target` (the last one if rounding leaves it short).
fn pick(probs: &[f32], tokens: impl Iterator<Item = u32>, target: f32) -> u32 {
    let mut acc = 0.0;
    let mut last = 0;
    for t in tokens {
        acc += probs.get(t as usize).copied().unwrap_or(0.0);
        last = t;
        if target < acc {
            return t;
        }
    }
    last
}

/// Sorts `v` so that `first(a, b)` holds for every earlier `a` and later
/// `b` (`first` a strict total order). A heap sort: in place, no recursion,
/// O(n log n), and written with `get` so that it has no panic path (core's
/// sorts keep bounds checks the optimizer cannot remove).
fn heap_sort(v: &mut [u32], first: impl Fn(u32, u32) -> bool) {
    // `v[i] = x` without a panic path (every `i` here is in range).
    fn put(v: &mut [u32], i: usize, x: u32) {
        if let Some(slot) = v.get_mut(i) {
            *slot = x;
        }
    }
    // A heap whose root is the element that sorts last.
    let sift = |v: &mut [u32], mut root: usize, end: usize| {
        loop {
            let mut child = 2 * root + 1;
            if child >= end {
                return;
            }
            let (Some(&l), r) = (v.get(child), v.get(child + 1).copied()) else { return };
            let mut c = l;
            if let Some(r) = r.filter(|_| child + 1 < end)
                && first(l, r)
            {
                child += 1;
                c = r;
            }
            let Some(&top) = v.get(root) else { return };
            if !first(top, c) {
                return;
            }
            put(v, root, c);
            put(v, child, top);
            root = child;
        }
    };
    let n = v.len();
    for root in (0..n / 2).rev() {
        sift(v, root, n);
    }
    for end in (1..n).rev() {
        // The root (last in order) goes to the end.
        let (Some(&a), Some(&b)) = (v.first(), v.get(end)) else { return };
        put(v, 0, b);
        put(v, end, a);
        sift(v, 0, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_sort_orders_as_core_sort() {
        let mut rng = Rng::new(3);
        let sizes: &[usize] = if cfg!(miri) { &[0, 1, 2, 3, 7, 64] } else { &[0, 1, 2, 3, 7, 64, 129, 1000] };
        for &n in sizes {
            let keys: std::vec::Vec<u32> = (0..n).map(|_| (rng.next_u64() % 17) as u32).collect();
            let first =
                |a: u32, b: u32| keys[a as usize].cmp(&keys[b as usize]).reverse().then(a.cmp(&b)).is_lt();
            let mut ours: std::vec::Vec<u32> = (0..n as u32).collect();
            heap_sort(&mut ours, first);
            let mut want: std::vec::Vec<u32> = (0..n as u32).collect();
            want.sort_by(|&a, &b| keys[b as usize].cmp(&keys[a as usize]).then(a.cmp(&b)));
            assert_eq!(ours, want, "n = {n}");
        }
    }

    #[test]
    fn splitmix_reference_values() {
        // First outputs for seed 0, as in the reference C implementation (Vigna).
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn greedy_ties_to_lower_id() {
        let mut s = Sampler::greedy();
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0], &mut [0; 3]).unwrap(), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 2 has probability ~0.97: with top_p 0.5 it is always chosen.
        let mut s = Sampler::new(1.0, 0.5, 7);
        for _ in 0..100 {
            let mut l = [0.0, 0.0, 5.0, -1.0];
            assert_eq!(s.sample(&mut l, &mut [0; 4]).unwrap(), 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(1.0, 1.0, 1);
        let mut counts = [0u32; 2];
        // Under Miri fewer draws and a wider band (sd ~14 at 1,000).
        let n = if cfg!(miri) { 1_000 } else { 10_000 };
        for _ in 0..n {
            let mut l = [0.0, libm::logf(3.0)];
            counts[s.sample(&mut l, &mut [0; 2]).unwrap() as usize] += 1;
        }
        // p = 0.75: 7500 expected, sd ~43.
        let (lo, hi) = if cfg!(miri) { (690, 810) } else { (7300, 7700) };
        assert!((lo..hi).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(Sampler::new(-1.0, 1.0, 0).sample(&mut [0.0], &mut [0]).is_err());
        assert!(Sampler::new(1.0, 0.0, 0).sample(&mut [0.0], &mut [0]).is_err());
        assert!(Sampler::greedy().sample(&mut [f32::NAN], &mut [0]).is_err());
    }
}
