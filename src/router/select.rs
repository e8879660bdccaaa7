//! Top-k selection shared by the float and the integer router.
//!
//! One pass over the experts keeps the k best in a sorted list; an expert
//! enters only if it is *strictly* better than an entry, so among equal
//! scores the lower index always wins. Group-limited routing first keeps the
//! `keep` groups with the largest sum of their two best members (ties: lower
//! group), then chooses only among experts of those groups; the others are
//! out entirely, as if masked with -inf.

use super::{Groups, MAX_K};

/// Maximum number of expert groups.
pub const MAX_GROUPS: usize = 64;

/// Inserts `(e, s)` into `best` (sorted by score, descending) if it ranks
/// among the first `k`.
fn offer<T: PartialOrd + Copy>(best: &mut heapless::Vec<(usize, T), MAX_K>, k: usize, e: usize, s: T) {
    let pos = best.iter().position(|&(_, b)| s > b).unwrap_or(best.len());
    if pos >= k {
        return;
    }
    if best.len() >= k {
        best.pop();
    }
    // Inserted by carrying each later entry one place down (`insert`'s
    // index assertion would be a panic path; rebuilding the list copied it
    // whole). The push cannot fail: len < k <= MAX_K after the pop.
    let mut carry = (e, s);
    for slot in best.iter_mut().skip(pos) {
        core::mem::swap(slot, &mut carry);
    }
    let _ = best.push(carry);
}

/// Sum of the two best `value`s of group `g` (one if the group has one member).
fn group_score<T: PartialOrd + Copy + core::ops::Add<Output = T>>(
    g: usize,
    size: usize,
    value: &impl Fn(usize) -> T,
) -> Option<T> {
    let mut top: heapless::Vec<(usize, T), MAX_K> = heapless::Vec::new();
    for e in g * size..(g + 1) * size {
        offer(&mut top, 2, e, value(e));
    }
    match top.as_slice() {
        [(_, a), (_, b)] => Some(*a + *b),
        [(_, a)] => Some(*a),
        _ => None,
    }
}

/// Bit mask of the groups kept, or all ones without groups.
pub(super) fn kept_groups<T: PartialOrd + Copy + core::ops::Add<Output = T>>(
    experts: usize,
    groups: Option<Groups>,
    value: impl Fn(usize) -> T,
) -> u64 {
    let Some(Groups { count, keep }) = groups else {
        return u64::MAX;
    };
    let size = experts / count.max(1);
    let mut mask = 0u64;
    for _ in 0..keep {
        let mut best: Option<(usize, T)> = None;
        for g in (0..count).filter(|&g| mask & (1 << g) == 0) {
            if let Some(s) = group_score(g, size, &value)
                && best.is_none_or(|(_, b)| s > b)
            {
                best = Some((g, s));
            }
        }
        if let Some((g, _)) = best {
            mask |= 1 << g;
        }
    }
    mask
}

/// The `k` experts with the largest `key`, among those whose group is in
/// `mask`; sorted by key, descending (ties: lower index first).
pub(super) fn top_k<T: PartialOrd + Copy>(
    experts: usize,
    k: usize,
    group_size: usize,
    mask: u64,
    key: impl Fn(usize) -> T,
) -> heapless::Vec<(usize, T), MAX_K> {
    let mut best = heapless::Vec::new();
    for e in 0..experts {
        let g = e / group_size.max(1);
        if g < 64 && mask & (1 << g) == 0 {
            continue;
        }
        offer(&mut best, k, e, key(e));
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_lower_index() {
        let s = [1.0f32, 3.0, 3.0, 2.0, 3.0];
        let got = top_k(5, 3, 1, u64::MAX, |e| s[e]);
        assert_eq!(got.iter().map(|p| p.0).collect::<heapless::Vec<_, 8>>(), [1, 2, 4]);
    }

    #[test]
    fn groups_mask_whole_groups() {
        // 3 groups of 2: sums 3, 11, 2 -> keep group 1 only.
        let s = [1.0f32, 2.0, 5.0, 6.0, 0.0, 2.0];
        let mask = kept_groups(6, Some(Groups { count: 3, keep: 1 }), |e| s[e]);
        assert_eq!(mask, 0b010);
        let got = top_k(6, 2, 2, mask, |e| s[e]);
        assert_eq!(got.iter().map(|p| p.0).collect::<heapless::Vec<_, 8>>(), [3, 2]);
    }
}
