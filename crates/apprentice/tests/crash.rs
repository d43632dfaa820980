//! Nothing acknowledged is lost: not when the gateway is killed outright in durable mode, and not
//! when it is asked to stop (SIGTERM) in async mode.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apprentice_core::config::WriteMode;
use apprentice_store::{SqliteStore, Store};
use serde_json::{json, Value};
use uuid::Uuid;

/// Sends inferences from several concurrent clients until `stop_after` were acknowledged; returns
/// the acknowledged ids while requests are still in flight.
async fn load_until(url: &str, stop_after: usize) -> (Arc<Mutex<BTreeSet<Uuid>>>, Vec<tokio::task::JoinHandle<()>>) {
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let client = reqwest::Client::new();
    let mut workers = Vec::new();
    for worker in 0..8 {
        let (acked, client, url) = (acked.clone(), client.clone(), url.to_string());
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let body = json!({"function_name": "act", "input": {"messages": [{"role": "user", "content": {"observation": format!("w{worker} step {i}")}}]}});
                let Ok(response) = client.post(format!("{url}/inference")).json(&body).send().await else { return };
                if response.status() != 200 {
                    return;
                }
                let Ok(answer) = response.json::<Value>().await else { return };
                let id: Uuid = answer["inference_id"].as_str().expect("inference_id").parse().expect("uuid");
                acked.lock().unwrap().insert(id);
            }
        }));
    }
    while acked.lock().unwrap().len() < stop_after {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (acked, workers)
}

async fn missing_from_store(db: &std::path::Path, acked: &BTreeSet<Uuid>) -> Vec<Uuid> {
    let store = SqliteStore::open(db, WriteMode::Durable).await.expect("reopen store");
    let mut missing = Vec::new();
    for id in acked {
        if store.inference(*id).await.expect("read").is_none() {
            missing.push(*id);
        }
    }
    missing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_acknowledging_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = common::serve(dir.path(), &common::config("durable"));
    let (acked, workers) = load_until(&served.url, 300).await;
    // SIGKILL: no handler runs, no buffer is flushed. Requests are still in flight.
    served.child.kill().expect("SIGKILL the gateway");
    let acked_at_kill = acked.lock().unwrap().clone();
    served.child.wait().expect("reap");
    for w in workers {
        let _ = w.await;
    }
    // Responses that were already on the wire when the kill landed count as acknowledged too.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= acked_at_kill.len() && acked.len() >= 300);
    let missing = missing_from_store(&served.db, &acked).await;
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged inferences lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_the_async_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = common::serve(dir.path(), &common::config("async"));
    let (acked, workers) = load_until(&served.url, 300).await;
    let status =
        std::process::Command::new("kill").args(["-TERM", &served.child.id().to_string()]).status().expect("run kill");
    assert!(status.success());
    let exit = served.child.wait().expect("wait for graceful exit");
    assert!(exit.success(), "gateway exited with {exit:?} after SIGTERM");
    for w in workers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    let missing = missing_from_store(&served.db, &acked).await;
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged inferences lost in async mode: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}
