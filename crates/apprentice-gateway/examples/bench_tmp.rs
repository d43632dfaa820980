use apprentice_core::config::WriteMode;
use apprentice_gateway::bench::{run_gateway_bench, BenchOptions};
#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join("apprentice-bench-tmp");
    let modes: Vec<WriteMode> = match std::env::args().nth(1).as_deref() {
        Some("async") => vec![WriteMode::Async],
        Some("durable") => vec![WriteMode::Durable],
        _ => vec![WriteMode::Durable, WriteMode::Async],
    };
    for mode in modes {
        let options = BenchOptions { write_mode: mode, store_dir: dir.clone(), ..BenchOptions::default() };
        match run_gateway_bench(&options).await {
            Ok(report) => println!("{}", report.table()),
            Err(e) => println!("error: {e}"),
        }
    }
}
