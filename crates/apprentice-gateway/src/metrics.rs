//! Prometheus text exposition for `GET /metrics`, kept dependency-free: a handful of labelled
//! counters and fixed-bucket histograms behind one mutex each, cheap at the request rates a single
//! gateway sees.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use apprentice_core::config::WeightFormat;
use apprentice_model::serve::SchedulerStats;

const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<Labels, u64>>,
    request_latency: Mutex<BTreeMap<Labels, Histogram>>,
    provider_errors: Mutex<BTreeMap<Labels, u64>>,
    inferences: Mutex<BTreeMap<Labels, u64>>,
    store_writes: Mutex<Histogram>,
    store_records: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a metrics lock cannot leave the counters inconsistent in a harmful way.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Metrics {
    pub fn observe_request(&self, endpoint: &str, status: u16, elapsed: Duration) {
        let labels = vec![("endpoint", endpoint.to_string()), ("status", status.to_string())];
        *lock(&self.requests).entry(labels).or_default() += 1;
        lock(&self.request_latency)
            .entry(vec![("endpoint", endpoint.to_string())])
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    pub fn provider_error(&self, model: &str, provider: &str) {
        let labels = vec![("model", model.to_string()), ("provider", provider.to_string())];
        *lock(&self.provider_errors).entry(labels).or_default() += 1;
    }

    pub fn inference(&self, function: &str, variant: &str) {
        let labels = vec![("function", function.to_string()), ("variant", variant.to_string())];
        *lock(&self.inferences).entry(labels).or_default() += 1;
    }

    pub fn store_write(&self, elapsed: Duration, records: usize) {
        lock(&self.store_writes).observe(elapsed.as_secs_f64());
        *lock(&self.store_records) += records as u64;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        counter(&mut out, "apprentice_requests_total", "HTTP requests by endpoint and status.", &lock(&self.requests));
        out.push_str("# HELP apprentice_request_duration_seconds Time to answer an HTTP request.\n");
        out.push_str("# TYPE apprentice_request_duration_seconds histogram\n");
        for (labels, h) in lock(&self.request_latency).iter() {
            histogram(&mut out, "apprentice_request_duration_seconds", labels, h);
        }
        counter(
            &mut out,
            "apprentice_provider_errors_total",
            "Failed provider calls (including ones a fallback recovered).",
            &lock(&self.provider_errors),
        );
        counter(
            &mut out,
            "apprentice_inferences_total",
            "Inferences served, by function and variant.",
            &lock(&self.inferences),
        );
        out.push_str("# HELP apprentice_store_write_duration_seconds Time to commit one batch of records.\n");
        out.push_str("# TYPE apprentice_store_write_duration_seconds histogram\n");
        histogram(&mut out, "apprentice_store_write_duration_seconds", &vec![], &lock(&self.store_writes));
        out.push_str("# HELP apprentice_store_records_written_total Records committed to the store.\n");
        out.push_str("# TYPE apprentice_store_records_written_total counter\n");
        let _ = writeln!(out, "apprentice_store_records_written_total {}", *lock(&self.store_records));
        out
    }
}

/// The schedulers of the loaded local models: queue depth, batch size, tokens/s (gauges) and
/// what they generated, prefilled and reused (counters), labelled by model file and weights.
pub fn render_local_models(out: &mut String, models: &[(String, WeightFormat, SchedulerStats)]) {
    let gauges: [(&str, &str, fn(&SchedulerStats) -> f64); 5] = [
        ("apprentice_local_queue_depth", "Requests waiting for a place in a local model's batch.", |s| {
            s.queue_depth as f64
        }),
        ("apprentice_local_batch_size", "Sequences a local model decodes together now.", |s| s.batch_size as f64),
        ("apprentice_local_tokens_per_second", "Tokens a local model generated per second, last 5 s.", |s| {
            s.tokens_per_second
        }),
        ("apprentice_local_cached_prefixes", "Finished sequences kept for their episodes' next turns.", |s| {
            s.cached_prefixes as f64
        }),
        ("apprentice_local_cached_prefix_bytes", "Memory of those cached keys and values.", |s| {
            s.cached_prefix_bytes as f64
        }),
    ];
    let counters: [(&str, &str, fn(&SchedulerStats) -> u64); 5] = [
        ("apprentice_local_requests_total", "Generations a local model started.", |s| s.requests),
        ("apprentice_local_generated_tokens_total", "Tokens a local model generated.", |s| s.generated_tokens),
        ("apprentice_local_prefilled_tokens_total", "Prompt tokens a local model ran.", |s| s.prefilled_tokens),
        ("apprentice_local_reused_tokens_total", "Prompt tokens served from cached prefixes.", |s| s.reused_tokens),
        ("apprentice_local_steps_total", "Batched decode steps.", |s| s.steps),
    ];
    let labels = |path: &str, weights: WeightFormat| {
        label_text(&vec![("model", path.to_string()), ("weights", weights.name().to_string())], None)
    };
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (path, weights, stats) in models {
            let _ = writeln!(out, "{name}{} {}", labels(path, *weights), value(stats));
        }
    }
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (path, weights, stats) in models {
            let _ = writeln!(out, "{name}{} {}", labels(path, *weights), value(stats));
        }
    }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn label_text(labels: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn counter(out: &mut String, name: &str, help: &str, values: &BTreeMap<Labels, u64>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, value) in values {
        let _ = writeln!(out, "{name}{} {value}", label_text(labels, None));
    }
}

fn histogram(out: &mut String, name: &str, labels: &Labels, h: &Histogram) {
    for (bound, count) in LATENCY_BUCKETS.iter().zip(h.counts.iter()) {
        let _ = writeln!(out, "{name}_bucket{} {count}", label_text(labels, Some(("le", bound.to_string()))));
    }
    let _ = writeln!(out, "{name}_bucket{} {}", label_text(labels, Some(("le", "+Inf".into()))), h.count);
    let _ = writeln!(out, "{name}_sum{} {}", label_text(labels, None), h.sum);
    let _ = writeln!(out, "{name}_count{} {}", label_text(labels, None), h.count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.observe_request("/inference", 200, Duration::from_millis(3));
        m.observe_request("/inference", 400, Duration::from_micros(200));
        m.provider_error("gpt", "openai");
        m.store_write(Duration::from_micros(800), 5);
        let text = m.render();
        assert!(text.contains("apprentice_requests_total{endpoint=\"/inference\",status=\"200\"} 1"), "{text}");
        assert!(
            text.contains("apprentice_request_duration_seconds_bucket{endpoint=\"/inference\",le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(text.contains("apprentice_request_duration_seconds_count{endpoint=\"/inference\"} 2"), "{text}");
        assert!(text.contains("apprentice_provider_errors_total{model=\"gpt\",provider=\"openai\"} 1"), "{text}");
        assert!(text.contains("apprentice_store_write_duration_seconds_bucket{le=\"0.001\"} 1"), "{text}");
        assert!(text.contains("apprentice_store_records_written_total 5"), "{text}");
    }

    #[test]
    fn renders_local_model_schedulers() {
        let stats = SchedulerStats { queue_depth: 3, batch_size: 8, generated_tokens: 42, ..SchedulerStats::default() };
        let mut text = String::new();
        render_local_models(&mut text, &[("/m/a.gguf".into(), WeightFormat::Q8_0, stats)]);
        let labels = "{model=\"/m/a.gguf\",weights=\"q8_0\"}";
        assert!(text.contains(&format!("apprentice_local_queue_depth{labels} 3")), "{text}");
        assert!(text.contains(&format!("apprentice_local_batch_size{labels} 8")), "{text}");
        assert!(text.contains(&format!("apprentice_local_generated_tokens_total{labels} 42")), "{text}");
        assert!(text.contains("# TYPE apprentice_local_tokens_per_second gauge"), "{text}");
    }
}
