//! `cargo run --release -p apprentice-train --example train_speed -- MODEL [STEPS]`: LoRA r=16,
//! 4 × 256 tokens, tokens/s and peak memory (the workload of `apprentice bench train`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = std::path::PathBuf::from(args.get(1).ok_or("usage: train_speed MODEL [STEPS]")?);
    let steps = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let r = apprentice_train::bench::train_throughput(&model, 4, 256, 16, steps, Default::default())?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
