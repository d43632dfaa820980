//! `apprentice demo`: the record half of the loop on embedded defaults. A scripted application
//! holds multi-turn support conversations through the gateway (native and OpenAI-compatible APIs),
//! sends inference- and episode-level feedback, and the demo reads back what the store holds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use apprentice_core::{Config, FeedbackValue};
use apprentice_gateway::{Gateway, RunningGateway};
use apprentice_store::InferenceQuery;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};

const CONFIG: &str = include_str!("demo.toml");
const CUSTOMERS: [&str; 4] = ["Ada", "Grace", "Linus", "Barbara"];
const MESSAGES: [&str; 3] = ["I cannot log in.", "The reset link expired.", "It works now, thanks."];

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Folder for the demo's store and results.
    #[arg(long, default_value = "apprentice-demo")]
    out: PathBuf,
    #[arg(long, default_value_t = 24)]
    episodes: usize,
}

#[derive(Serialize, Default)]
struct VariantSummary {
    inferences: u64,
    episodes: u64,
    resolved_episodes: u64,
    mean_latency_ms: f64,
    total_cost: f64,
    mean_helpfulness: Option<f64>,
    /// Which provider of the variant's model answered, and how often (fallback shows here).
    answered_by: BTreeMap<String, u64>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let store_path = args.out.join("apprentice.db");
    let _ = std::fs::remove_file(&store_path);
    let mut config = Config::parse(CONFIG, std::path::Path::new("<embedded demo.toml>"), &args.out)?;
    config.store.path = store_path.clone();
    let gateway = Gateway::open(config).await?;
    let server = RunningGateway::start(gateway.clone(), "127.0.0.1:0".parse()?).await?;
    let client = reqwest::Client::new();
    let url = server.url();

    let bar = ProgressBar::new(args.episodes as u64)
        .with_style(ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} episodes")?.progress_chars("=> "));
    bar.set_message("recording");
    for episode in 0..args.episodes {
        run_episode(&client, &url, episode).await.with_context(|| format!("episode {episode}"))?;
        bar.inc(1);
    }
    bar.finish();

    let summary = summarize(&gateway).await?;
    server.shutdown().await?;
    print_table(&summary);
    let results = args.out.join("demo-results.json");
    std::fs::write(&results, serde_json::to_string_pretty(&summary)?)?;
    println!("\nstore: {}\nresults: {}", store_path.display(), results.display());
    Ok(())
}

/// One support conversation: each turn extends the previous input with the answer and a new message.
async fn run_episode(client: &reqwest::Client, url: &str, episode: usize) -> anyhow::Result<()> {
    let customer = CUSTOMERS[episode % CUSTOMERS.len()];
    let mut messages: Vec<Value> = Vec::new();
    let mut episode_id: Option<String> = None;
    for (turn, message) in MESSAGES.iter().enumerate() {
        messages.push(json!({"role": "user", "content": {"customer": customer, "message": message}}));
        // Alternate the two APIs so the demo records through both.
        let (inference_id, reply) = if turn % 2 == 0 {
            let body = json!({
                "function_name": "support::reply",
                "episode_id": episode_id,
                "input": {"system": {"product": "Acme Cloud"}, "messages": messages},
                "tags": {"source": "demo"},
            });
            let answer = post(client, &format!("{url}/inference"), &body).await?;
            episode_id = answer["episode_id"].as_str().map(str::to_string);
            (answer["inference_id"].clone(), answer["content"][0]["text"].as_str().unwrap_or_default().to_string())
        } else {
            let mut openai_messages = vec![json!({"role": "system", "content": {"product": "Acme Cloud"}})];
            openai_messages.extend(messages.iter().cloned());
            let body = json!({"model": "function::support::reply", "messages": openai_messages, "episode_id": episode_id, "tags": {"source": "demo"}});
            let answer = post(client, &format!("{url}/v1/chat/completions"), &body).await?;
            (answer["id"].clone(), answer["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string())
        };
        messages.push(json!({"role": "assistant", "content": reply.clone()}));
        // A stand-in for a human rating: longer answers count as more helpful.
        let helpfulness = (reply.split_whitespace().count() as f64 / 12.0).min(1.0);
        post(
            client,
            &format!("{url}/feedback"),
            &json!({"metric_name": "helpfulness", "inference_id": inference_id, "value": helpfulness}),
        )
        .await?;
    }
    let resolved = !episode.is_multiple_of(3);
    post(
        client,
        &format!("{url}/feedback"),
        &json!({"metric_name": "resolved", "episode_id": episode_id, "value": resolved}),
    )
    .await?;
    Ok(())
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    let response = client.post(url).json(body).send().await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {answer}");
    }
    Ok(answer)
}

async fn summarize(gateway: &Gateway) -> anyhow::Result<BTreeMap<String, VariantSummary>> {
    let inferences = gateway
        .store
        .inferences(&InferenceQuery { function_name: Some("support::reply".into()), ..Default::default() })
        .await?;
    let mut summary: BTreeMap<String, VariantSummary> = BTreeMap::new();
    let mut helpfulness: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut episodes: BTreeMap<String, BTreeMap<uuid::Uuid, bool>> = BTreeMap::new();
    for inference in &inferences {
        let row = summary.entry(inference.variant_name.clone()).or_default();
        row.inferences += 1;
        *row.answered_by.entry(inference.provider_name.clone()).or_default() += 1;
        row.mean_latency_ms += inference.latency_ms;
        row.total_cost += inference.cost.unwrap_or(0.0);
        for feedback in gateway.store.feedback_for(inference.id).await? {
            if let FeedbackValue::Float(v) = feedback.value {
                helpfulness.entry(inference.variant_name.clone()).or_default().push(v);
            }
        }
        let seen = episodes.entry(inference.variant_name.clone()).or_default();
        if let std::collections::btree_map::Entry::Vacant(slot) = seen.entry(inference.episode_id) {
            let feedback = gateway.store.feedback_for(inference.episode_id).await?;
            slot.insert(feedback.iter().any(|f| f.value == FeedbackValue::Boolean(true)));
        }
    }
    for (variant, row) in summary.iter_mut() {
        row.mean_latency_ms /= row.inferences.max(1) as f64;
        let values = helpfulness.get(variant).cloned().unwrap_or_default();
        row.mean_helpfulness = (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
        let seen = episodes.get(variant).cloned().unwrap_or_default();
        row.episodes = seen.len() as u64;
        row.resolved_episodes = seen.values().filter(|r| **r).count() as u64;
    }
    Ok(summary)
}

fn print_table(summary: &BTreeMap<String, VariantSummary>) {
    println!(
        "\n{:<10} {:>10} {:>9} {:>9} {:>12} {:>12} {:>12}  answered by",
        "variant", "inferences", "episodes", "resolved", "latency ms", "cost", "helpfulness"
    );
    for (variant, row) in summary {
        println!(
            "{:<10} {:>10} {:>9} {:>9} {:>12.3} {:>12.6} {:>12}  {}",
            variant,
            row.inferences,
            row.episodes,
            row.resolved_episodes,
            row.mean_latency_ms,
            row.total_cost,
            row.mean_helpfulness.map(|h| format!("{h:.2}")).unwrap_or_else(|| "-".into()),
            row.answered_by.iter().map(|(p, n)| format!("{p}×{n}")).collect::<Vec<_>>().join(", ")
        );
    }
}
