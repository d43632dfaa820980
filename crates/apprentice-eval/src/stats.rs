//! Intervals and stopping rules for success rates measured on a finite number of tasks.

use serde::{Deserialize, Serialize};

/// z of a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// A point estimate with its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

impl Interval {
    pub fn width(&self) -> f64 {
        self.high - self.low
    }
}

/// Wilson score interval of a success rate: unlike the normal approximation it stays inside
/// [0, 1] and is not degenerate at 0 or n successes, which small evaluations hit often.
pub fn wilson(successes: usize, n: usize, z: f64) -> Interval {
    if n == 0 {
        return Interval { estimate: f64::NAN, low: 0.0, high: 1.0 };
    }
    let (k, n) = (successes as f64, n as f64);
    let p = k / n;
    let z2 = z * z;
    let denominator = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denominator;
    let half = z / denominator * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Interval { estimate: p, low: (center - half).max(0.0), high: (center + half).min(1.0) }
}

/// Mean with a normal-approximation interval (z · s/√n, sample standard deviation).
pub fn mean_interval(values: &[f64], z: f64) -> Interval {
    let n = values.len();
    if n == 0 {
        return Interval { estimate: f64::NAN, low: f64::NAN, high: f64::NAN };
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Interval { estimate: mean, low: f64::NEG_INFINITY, high: f64::INFINITY };
    }
    let variance = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64;
    let half = z * (variance / n as f64).sqrt();
    Interval { estimate: mean, low: mean - half, high: mean + half }
}

/// The difference `a − b` of two policies measured on the same tasks: the interval of the mean
/// per-task difference, which is much narrower than comparing two independent intervals when
/// the policies fail on the same hard tasks.
pub fn paired_difference(a: &[f64], b: &[f64], z: f64) -> Result<Interval, String> {
    if a.len() != b.len() {
        return Err(format!("paired comparison needs the same tasks: {} against {} results", a.len(), b.len()));
    }
    let differences: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    Ok(mean_interval(&differences, z))
}

/// The `q`-quantile (0..=1) by linear interpolation between order statistics; NaN when empty.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let position = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (below, above) = (position.floor() as usize, position.ceil() as usize);
    sorted[below] + (sorted[above] - sorted[below]) * (position - below as f64)
}

/// Stop evaluating a policy once its success interval is narrower than `max_width`, after at
/// least `min_episodes` (a few lucky first episodes must not end an evaluation).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveStopping {
    pub max_width: f64,
    pub min_episodes: usize,
}

impl AdaptiveStopping {
    pub fn should_stop(&self, successes: usize, n: usize) -> bool {
        n >= self.min_episodes.max(1) && wilson(successes, n, Z95).width() <= self.max_width
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn wilson_matches_known_values() {
        // Reference values computed independently (Python, the textbook formula).
        let i = wilson(5, 10, Z95);
        assert!(near(i.low, 0.236_593_090_512_564) && near(i.high, 0.763_406_909_487_436_1), "{i:?}");
        let i = wilson(90, 100, Z95);
        assert!(near(i.low, 0.825_634_338_495_086_5) && near(i.high, 0.944_770_862_939_324_9), "{i:?}");
        let i = wilson(0, 20, Z95);
        assert!(near(i.low, 0.0) && near(i.high, 0.161_125_158_052_819_38), "{i:?}");
        let i = wilson(20, 20, Z95);
        assert!(near(i.low, 0.838_874_841_947_180_6) && near(i.high, 1.0), "{i:?}");
        assert_eq!(wilson(0, 0, Z95).low, 0.0);
    }

    #[test]
    fn paired_difference_uses_per_task_differences() {
        let a = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0];
        let b = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0];
        let d = paired_difference(&a, &b, Z95).unwrap();
        assert!(near(d.estimate, 0.4), "{d:?}");
        assert!(near(d.low, 0.079_939_221_576_312_72) && near(d.high, 0.720_060_778_423_687_3), "{d:?}");
        // Identical policies: zero difference, zero width.
        let same = paired_difference(&a, &a, Z95).unwrap();
        assert!(near(same.estimate, 0.0) && near(same.width(), 0.0));
        assert!(paired_difference(&a, &b[..3], Z95).unwrap_err().contains("same tasks"));
    }

    #[test]
    fn percentiles_interpolate() {
        let v = [4.0, 1.0, 3.0, 2.0, 5.0];
        assert!(near(percentile(&v, 0.5), 3.0));
        assert!(near(percentile(&v, 0.95), 4.8));
        assert!(near(percentile(&v, 0.0), 1.0) && near(percentile(&v, 1.0), 5.0));
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn adaptive_stopping_waits_for_a_narrow_interval_and_a_minimum() {
        let rule = AdaptiveStopping { max_width: 0.2, min_episodes: 10 };
        // 5 of 5: interval [0.57, 1], too wide, and below the minimum.
        assert!(!rule.should_stop(5, 5));
        // 40 of 80 is 0.21 wide; 50 of 100 is 0.19 wide.
        assert!(!rule.should_stop(40, 80));
        assert!(rule.should_stop(50, 100));
        // All successes narrow fast, but the minimum still holds.
        assert!(!rule.should_stop(9, 9));
        assert!(rule.should_stop(30, 30));
    }
}
