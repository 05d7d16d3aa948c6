//! Largest-triangle-three-buckets (Steinarsson, 2013): `threshold` points of
//! a series that keep its shape (peaks, drops) where every n-th point
//! would lose them. The first and last points are always kept.

/// The indices of the points to keep, ascending; all of them when there
/// are no more than `threshold` (or `threshold` < 3).
pub fn lttb(x: &[f64], y: &[f64], threshold: usize) -> Vec<usize> {
    let n = x.len().min(y.len());
    if threshold >= n || threshold < 3 {
        return (0..n).collect();
    }
    let mut keep = Vec::with_capacity(threshold);
    keep.push(0);
    // The points between the first and the last, in threshold - 2 buckets.
    let every = (n - 2) as f64 / (threshold - 2) as f64;
    let mut a = 0;
    for i in 0..threshold - 2 {
        let start = (i as f64 * every) as usize + 1;
        let end = (((i + 1) as f64 * every) as usize + 1).min(n - 1);
        // The next bucket's mean is the third corner of the triangle.
        let next_end = (((i + 2) as f64 * every) as usize + 1).min(n);
        let (nx, ny) = if end < next_end {
            let len = (next_end - end) as f64;
            (
                x[end..next_end].iter().sum::<f64>() / len,
                y[end..next_end].iter().sum::<f64>() / len,
            )
        } else {
            (x[n - 1], y[n - 1])
        };
        let mut best = start;
        let mut best_area = -1.0;
        for j in start..end.max(start + 1).min(n - 1) {
            let area = ((x[a] - nx) * (y[j] - y[a]) - (x[a] - x[j]) * (ny - y[a])).abs();
            if area > best_area {
                best_area = area;
                best = j;
            }
        }
        keep.push(best);
        a = best;
    }
    keep.push(n - 1);
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spike_survives_what_striding_would_drop() {
        let n = 100_000;
        let x: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let mut y = vec![0.0; n];
        y[54_321] = 10.0;
        let keep = lttb(&x, &y, 500);
        assert_eq!(keep.len(), 500);
        assert_eq!((keep[0], keep[499]), (0, n - 1));
        assert!(keep.windows(2).all(|w| w[0] < w[1]), "not ascending");
        assert!(keep.contains(&54_321), "the spike was dropped");
        // Every 200th point would have missed it.
        assert!(!(0..n).step_by(200).any(|i| i == 54_321));
    }

    #[test]
    fn short_series_are_kept_whole() {
        assert_eq!(lttb(&[1.0, 2.0], &[3.0, 4.0], 500), vec![0, 1]);
        assert_eq!(lttb(&[], &[], 500), Vec::<usize>::new());
        assert_eq!(lttb(&[1.0, 2.0, 3.0, 4.0], &[0.0; 4], 2).len(), 4);
    }
}
