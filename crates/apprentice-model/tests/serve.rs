//! Serving many sequences at once: the batched engine against the training model, batched
//! generation against one-at-a-time generation token for token, cancellation, and prefix reuse
//! across interleaved episodes. Tiny random models; the real SmolLM2 is in `serve_smollm2.rs`.

mod model_support;

use std::ops::ControlFlow;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use apprentice_model::config::ModelConfig;
use apprentice_model::generate::{FinishReason, GenerateError, GenerateOptions, Generation, StreamEvent};
use apprentice_model::serve::{
    Chunk, Completion, Request, Scheduler, SchedulerConfig, ServingModel, Ticket, WeightFormat,
};
use model_support::{random_model, tiny_llama, tiny_qwen2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn serving(config: &ModelConfig, format: WeightFormat) -> Arc<ServingModel> {
    let loaded = random_model(config, 7);
    Arc::new(ServingModel::from_llama(&loaded.model, format).expect("serving model"))
}

fn prompt(seed: u64, len: usize, vocab: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(3..vocab as u32)).collect()
}

/// The last row of the training model's logits for `tokens`.
fn reference_logits(config: &ModelConfig, tokens: &[u32]) -> Vec<f32> {
    let loaded = random_model(config, 7);
    let ids = model_support::ids(&[tokens]);
    let logits = loaded.model.forward(&ids).expect("forward");
    let t = tokens.len();
    logits.get(0).unwrap().get(t - 1).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn f32_serving_matches_the_training_model_and_q8_0_stays_close() {
    for config in [tiny_llama(true), tiny_llama(false), tiny_qwen2()] {
        let tokens = prompt(1, 19, config.vocab_size);
        let expected = reference_logits(&config, &tokens);
        for (format, tolerance) in [(WeightFormat::F32, 1e-4), (WeightFormat::Q8_0, 0.05)] {
            let model = serving(&config, format);
            // Prefilled in uneven chunks, then the last token alone: the cache carries across.
            let mut cache = model.new_cache();
            let mut logits = None;
            for piece in [&tokens[..5], &tokens[5..18], &tokens[18..]] {
                let mut chunks = [Chunk { cache: &mut cache, tokens: piece, logits: true }];
                logits = model.forward(&mut chunks).unwrap().pop().unwrap();
            }
            let logits = logits.unwrap();
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = logits.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= tolerance * scale.max(1.0), "{format:?} {:?}: max |diff| {worst}", config.architecture);
            assert_eq!(cache.len(), tokens.len());
        }
    }
}

#[test]
fn a_sequence_gets_the_same_logits_alone_and_in_a_ragged_batch() {
    let config = tiny_llama(true);
    let model = serving(&config, WeightFormat::Q8_0);
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(10 + i, 3 + 5 * i as usize, config.vocab_size)).collect();
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            let mut cache = model.new_cache();
            model.forward(&mut [Chunk { cache: &mut cache, tokens: p, logits: true }]).unwrap().remove(0).unwrap()
        })
        .collect();
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut chunks: Vec<Chunk> =
        caches.iter_mut().zip(&prompts).map(|(cache, p)| Chunk { cache, tokens: p.as_slice(), logits: true }).collect();
    let together = model.forward(&mut chunks).unwrap();
    for (i, (a, b)) in alone.iter().zip(together).enumerate() {
        assert_eq!(a, &b.unwrap(), "sequence {i} differs bit for bit in the batch");
    }
}

/// Runs `requests` through a scheduler, each submitted after `delays[i]` decode steps' worth of
/// waiting, and returns the generations in request order.
fn run_all(model: &Arc<ServingModel>, config: SchedulerConfig, requests: &[Request], stagger: bool) -> Vec<Completion> {
    let scheduler = Scheduler::start(model.clone(), None, config, None);
    let (tx, rx) = mpsc::channel();
    let mut tickets = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let tx = tx.clone();
        let ticket = scheduler
            .submit(
                request.clone(),
                Box::new(|_| ControlFlow::Continue(())),
                Box::new(move |c| tx.send((i, c)).unwrap()),
            )
            .unwrap();
        tickets.push(ticket);
        if stagger {
            // Later requests join a batch already decoding.
            std::thread::sleep(Duration::from_millis(3 * (i as u64 % 3)));
        }
    }
    let mut out: Vec<Option<Completion>> = vec![None; requests.len()];
    for _ in 0..requests.len() {
        let (i, completion) = rx.recv_timeout(Duration::from_secs(60)).expect("every request completes");
        out[i] = Some(completion.expect("generation succeeds"));
    }
    out.into_iter().map(Option::unwrap).collect()
}

fn requests(config: &ModelConfig, temperature: f64) -> Vec<Request> {
    (0..10)
        .map(|i| Request {
            prompt: prompt(100 + i, 2 + 7 * (i as usize % 4), config.vocab_size),
            options: GenerateOptions {
                max_new_tokens: 3 + 4 * (i as usize % 3),
                temperature,
                top_p: (temperature > 0.0 && i % 2 == 0).then_some(0.9),
                seed: 1000 + i,
                stop_token_ids: vec![2],
                ..GenerateOptions::default()
            },
            prefix_key: None,
        })
        .collect()
}

fn tokens(completions: &[Completion]) -> Vec<(Vec<u32>, FinishReason)> {
    completions.iter().map(|c| (c.generation.tokens.clone(), c.generation.finish_reason)).collect()
}

#[test]
fn batched_generation_equals_one_at_a_time_token_for_token() {
    let config = tiny_llama(true);
    let model = serving(&config, WeightFormat::Q8_0);
    for temperature in [0.0, 1.0] {
        let requests = requests(&config, temperature);
        let no_reuse = |max_batch, prefill_chunk_tokens| SchedulerConfig {
            max_batch,
            prefill_chunk_tokens,
            prefix_cache_bytes: 0,
        };
        let alone = run_all(&model, no_reuse(1, 1024), &requests, false);
        // Joining and leaving mid-batch, prompts of different lengths, prefill in small chunks.
        let batched = run_all(&model, no_reuse(4, 5), &requests, true);
        let wide = run_all(&model, no_reuse(16, 64), &requests, false);
        assert_eq!(tokens(&alone), tokens(&batched), "temperature {temperature}: batch of 4");
        assert_eq!(tokens(&alone), tokens(&wide), "temperature {temperature}: batch of 16");
        assert!(alone.iter().any(|c| c.generation.tokens.len() > 3), "the test generates more than a token or two");
        // Each is charged its share of the steps it was in: a batch splits the machine's time.
        assert!(batched.iter().all(|c| c.compute > Duration::ZERO));
    }
}

#[test]
fn a_cancelled_request_frees_its_place_for_the_next() {
    let config = tiny_llama(true);
    let model = serving(&config, WeightFormat::Q8_0);
    let scheduler =
        Scheduler::start(model.clone(), None, SchedulerConfig { max_batch: 1, ..SchedulerConfig::default() }, None);
    let long = Request {
        prompt: prompt(1, 5, config.vocab_size),
        options: GenerateOptions { max_new_tokens: 100_000, ..GenerateOptions::greedy(0) },
        prefix_key: None,
    };
    let short = Request { options: GenerateOptions::greedy(3), ..long.clone() };
    let (tx, rx) = mpsc::channel::<(&str, Result<Completion, GenerateError>)>();
    let (started_tx, started) = mpsc::channel();
    let submit =
        |request: Request, name: &'static str, sink: Box<dyn FnMut(StreamEvent<'_>) -> ControlFlow<()> + Send>| {
            let tx = tx.clone();
            scheduler.submit(request, sink, Box::new(move |c| tx.send((name, c)).unwrap())).unwrap()
        };
    let long_ticket: Ticket = submit(
        long.clone(),
        "long",
        Box::new(move |_| {
            let _ = started_tx.send(());
            ControlFlow::Continue(())
        }),
    );
    started.recv_timeout(Duration::from_secs(30)).unwrap();
    let _short_ticket = submit(short, "short", Box::new(|_| ControlFlow::Continue(())));
    assert_eq!(scheduler.stats().queue_depth, 1, "the short request waits: the only place is taken");
    long_ticket.cancel();
    let (first, outcome) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(first, "long");
    assert_eq!(outcome.unwrap().generation.finish_reason, FinishReason::Cancelled);
    let (second, outcome) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(second, "short");
    assert_eq!(outcome.unwrap().generation.tokens.len(), 3);

    // A ticket dropped with cancel-on-drop (a client that hung up) and a sink that breaks also
    // end their requests.
    let dropped = submit(long.clone(), "dropped", Box::new(|_| ControlFlow::Continue(()))).cancel_on_drop();
    drop(dropped);
    let (name, outcome) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!((name, outcome.unwrap().generation.finish_reason), ("dropped", FinishReason::Cancelled));
    let mut seen = 0;
    let _breaks = submit(
        long,
        "breaks",
        Box::new(move |_| {
            seen += 1;
            if seen >= 4 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }),
    );
    let (name, outcome) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let generation: Generation = outcome.unwrap().generation;
    assert_eq!((name, generation.finish_reason, generation.tokens.len()), ("breaks", FinishReason::Cancelled, 4));
    assert_eq!(scheduler.stats().batch_size, 0);
}

#[test]
fn each_episode_continues_its_own_prefix_while_others_run_in_between() {
    let config = tiny_llama(true);
    let model = serving(&config, WeightFormat::Q8_0);
    let scheduler = Scheduler::start(model.clone(), None, SchedulerConfig::default(), None);
    let generate = |prompt: &[u32], episode: &str| -> Completion {
        let (tx, rx) = mpsc::channel();
        let request = Request {
            prompt: prompt.to_vec(),
            options: GenerateOptions { stop_token_ids: vec![2], ..GenerateOptions::greedy(4) },
            prefix_key: Some(episode.to_string()),
        };
        let _ticket = scheduler
            .submit(request, Box::new(|_| ControlFlow::Continue(())), Box::new(move |c| tx.send(c).unwrap()))
            .unwrap();
        rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap()
    };
    // Three episodes take turns; each turn's prompt is the episode's previous prompt, its answer
    // and a new observation, as an agent's conversation grows.
    let mut conversations: Vec<Vec<u32>> = (0..3).map(|e| prompt(50 + e, 20, config.vocab_size)).collect();
    let mut first_turn = true;
    for turn in 0..4 {
        for (e, conversation) in conversations.iter_mut().enumerate() {
            let before = scheduler.stats().prefilled_tokens;
            let completion = generate(conversation, &format!("episode-{e}"));
            let prefilled = scheduler.stats().prefilled_tokens - before;
            if !first_turn {
                // Only the answer and the new observation are new.
                assert!(
                    completion.reused_tokens >= conversation.len() - 12,
                    "turn {turn} episode {e}: reused {}",
                    completion.reused_tokens
                );
                assert_eq!(prefilled as usize, conversation.len() - completion.reused_tokens);
            }
            conversation.extend(completion.generation.tokens.iter().copied());
            conversation.extend(prompt(900 + 10 * turn + e as u64, 6, config.vocab_size));
        }
        first_turn = false;
    }
    let stats = scheduler.stats();
    assert_eq!(stats.cached_prefixes, 3, "one cached sequence per episode");
    assert!(stats.reused_tokens > stats.prefilled_tokens, "{stats:?}");

    // The same conversation played without any cache gives the same answer.
    let fresh = Scheduler::start(
        model.clone(),
        None,
        SchedulerConfig { prefix_cache_bytes: 0, ..SchedulerConfig::default() },
        None,
    );
    let (tx, rx) = mpsc::channel();
    let request = Request {
        prompt: conversations[1].clone(),
        options: GenerateOptions { stop_token_ids: vec![2], ..GenerateOptions::greedy(4) },
        prefix_key: None,
    };
    let _t = fresh
        .submit(request.clone(), Box::new(|_| ControlFlow::Continue(())), Box::new(move |c| tx.send(c).unwrap()))
        .unwrap();
    let without = rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
    let with = generate(&request.prompt, "episode-1");
    assert_eq!(without.reused_tokens, 0);
    assert!(with.reused_tokens > 0);
    assert_eq!(without.generation.tokens, with.generation.tokens);
}

#[test]
fn bad_requests_are_refused_before_they_queue() {
    let config = tiny_llama(true);
    let model = serving(&config, WeightFormat::F32);
    let scheduler = Scheduler::start(model, None, SchedulerConfig::default(), None);
    let submit = |prompt: Vec<u32>, options: GenerateOptions| {
        scheduler
            .submit(
                Request { prompt, options, prefix_key: None },
                Box::new(|_| ControlFlow::Continue(())),
                Box::new(|_| {}),
            )
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert!(submit(vec![], GenerateOptions::greedy(2)).contains("empty prompt"));
    assert!(submit(vec![5, 4000], GenerateOptions::greedy(2)).contains("outside the vocabulary"));
    let bad = GenerateOptions { temperature: -1.0, ..GenerateOptions::greedy(2) };
    assert!(submit(vec![5], bad).contains("temperature"));
}
