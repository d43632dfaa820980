//! The BabyAI scripted expert: it solves the test split at ε = 0, and its success degrades
//! smoothly as ε-noise (a uniformly random offered action with probability ε) grows.
//!
//! The acceptance test runs the full 1,000 test tasks per family (about a second even in a debug
//! build). `apprentice bench expert` prints the family × ε table over 1,000 episodes each.

use apprentice_core::{ContentBlock, FeedbackValue};
use apprentice_envs::babyai::expert::Expert;
use apprentice_envs::babyai::expert_eval::{evaluate_expert, ExpertStats};
use apprentice_envs::babyai::mission::{parse_instr, Status, Verifier};
use apprentice_envs::babyai::rng::Rng;
use apprentice_envs::babyai::tasks::{Family, TaskConfig};
use apprentice_envs::babyai::world::{Cell, Color, Object, Pos, World};
use apprentice_envs::babyai::BabyAi;
use apprentice_envs::{Env, Split, TaskId};

/// Episodes per family in the acceptance test.
const EPISODES_PER_FAMILY: u64 = 1_000;

fn evaluate(family: Family, n: u64, epsilon: f64, config: &TaskConfig) -> ExpertStats {
    evaluate_expert(family, n, epsilon, config).expect("tasks generate")
}

#[test]
fn expert_solves_every_family_at_epsilon_zero() {
    let n = EPISODES_PER_FAMILY;
    for family in Family::ALL {
        let stats = evaluate(family, n, 0.0, &TaskConfig::default());
        eprintln!(
            "{:<17} success {:.3}  mean return {:.3}  mean steps {:.1}  ({n} test tasks)",
            family.name(),
            stats.success_rate(),
            stats.mean_return(),
            stats.mean_steps()
        );
        assert!(stats.success_rate() >= 0.99, "{}: success {:.3} < 0.99", family.name(), stats.success_rate());
    }
}

#[test]
fn expert_handles_distractors() {
    let n = EPISODES_PER_FAMILY / 2;
    let config = TaskConfig { distractors: 8 };
    for family in Family::ALL {
        let stats = evaluate(family, n, 0.0, &config);
        eprintln!("{:<17} 8 distractors: success {:.3}", family.name(), stats.success_rate());
        assert!(stats.success_rate() >= 0.95, "{} with distractors: {:.3}", family.name(), stats.success_rate());
    }
}

#[test]
fn success_degrades_smoothly_with_noise() {
    let n = EPISODES_PER_FAMILY / 2;
    for family in Family::ALL {
        let rates: Vec<f64> = [0.0, 0.1, 0.3, 0.5]
            .iter()
            .map(|&e| evaluate(family, n, e, &TaskConfig::default()).success_rate())
            .collect();
        eprintln!("{:<17} success at ε = 0, 0.1, 0.3, 0.5: {rates:.3?}", family.name());
        for pair in rates.windows(2) {
            assert!(pair[1] <= pair[0] + 0.03, "{}: success rose with ε: {rates:?}", family.name());
        }
        // Noise costs steps but the expert recovers: still mostly successful at ε = 0.1.
        assert!(rates[1] >= 0.9, "{}: success at ε = 0.1 only {:.3}", family.name(), rates[1]);
    }
}

// ----- hand-made situations ------------------------------------------------------------------------

/// Runs the expert (no noise) on `world` for `mission`; the number of steps it took, if it
/// succeeded within `max_steps`.
fn solve(world: &World, mission: &str, max_steps: u32) -> Option<u32> {
    let instr = parse_instr(mission).expect("mission");
    let mut world = world.clone();
    let mut verifier = Verifier::new(&instr);
    let mut expert = Expert::new(&world);
    for step in 1..=max_steps {
        let action = expert.act(&world, &verifier);
        let effect = world.step(action);
        expert.observe(&world);
        match verifier.update(&world, &effect) {
            Status::Success => return Some(step),
            Status::Failure => return None,
            Status::InProgress => {}
        }
    }
    None
}

fn map(ascii: &str) -> World {
    World::from_ascii(ascii).expect("map")
}

#[test]
fn moves_a_blocking_object_out_of_a_corridor() {
    // A one-cell-wide corridor: the blue ball must be picked up and put behind the agent.
    let world = map("
        WWWWWWWWWWWWWW
        WW>>..AbKr..WW
        WWWWWWWWWWWWWW
    ");
    let steps = solve(&world, "pick up the red key", 64).expect("solved");
    // forward, pick up, turn, turn, drop, turn, turn, forward, pick up
    assert_eq!(steps, 9);
    assert!(solve(&world, "go to the red key", 64).is_some());
}

#[test]
fn fetches_the_key_with_full_hands() {
    let mut world = map("
        WWWWWWWWWWWWWW
        WW>>......KrWW
        WW..........WW
        WWWWLrWWWWWWWW
        WW..........WW
        WWWWWWWWWWWWWW
    ");
    world.set_carrying(Some(Object::ball(Color::Blue)));
    assert!(solve(&world, "open the red door", 64).is_some());
}

#[test]
fn explores_through_a_closed_door() {
    // The ball is out of sight behind a closed door; the expert opens it to look.
    let world = map("
        WWWWWWWWWWWWWWWWWW
        WW......WW......WW
        WW<<....Dg....AbWW
        WW......WW......WW
        WWWWWWWWWWWWWWWWWW
    ");
    let expert = Expert::new(&world);
    assert_eq!(expert.known(Pos::new(7, 2)), None, "the ball starts unseen");
    assert!(solve(&world, "go to the blue ball", 64).is_some());
    assert!(solve(&world, "pick up the blue ball", 64).is_some());
}

#[test]
fn unlocks_a_door_to_reach_an_unseen_target() {
    let world = map("
        WWWWWWWWWWWWWWWWWW
        WW..Kg..WW......WW
        WW<<....Lg....AbWW
        WW......WW......WW
        WWWWWWWWWWWWWWWWWW
    ");
    // Fetch the key, unlock, put the key down, pick up the ball.
    assert!(solve(&world, "pick up the blue ball", 128).is_some());
    assert!(solve(&world, "put the green key next to the blue ball", 128).is_some());
}

#[test]
fn puts_down_a_carried_target() {
    // Noise picked up the target of "go to": putting it down in front completes the act.
    let mut world = World::walled(8, 8);
    world.place_agent(Pos::new(3, 3), apprentice_envs::babyai::world::Dir::East).unwrap();
    world.set_carrying(Some(Object::ball(Color::Red)));
    assert_eq!(solve(&world, "go to the red ball", 64), Some(1));
    // "pick up" with the object already in hand: drop it and pick it up again.
    assert_eq!(solve(&world, "pick up the red ball", 64), Some(2));
    // Sequences run in order, whichever way the text puts them.
    world.set(Pos::new(6, 6), Cell::Object(Object::key(Color::Blue))).unwrap();
    assert!(solve(&world, "go to the blue key after you pick up the red ball", 64).is_some());
    assert!(solve(&world, "put the red ball next to the blue key, then go to the red ball", 64).is_some());
}

// ----- through the Env --------------------------------------------------------------------------

fn success_of(feedback: &[(String, FeedbackValue)]) -> Option<bool> {
    feedback.iter().find(|(name, _)| name == "success").and_then(|(_, value)| match value {
        FeedbackValue::Boolean(b) => Some(*b),
        _ => None,
    })
}

/// Plays `n` test tasks through `Env::expert_action` and `Env::step`, with ε-noise from
/// `action_space()`; the success rate.
fn env_success_rate(n: u64, epsilon: f64) -> f64 {
    let mut env = BabyAi::new();
    let space = env.action_space();
    let mut noise = Rng::new(17);
    let mut successes = 0;
    for index in 0..n {
        env.reset(TaskId { split: Split::Test, index }).expect("reset");
        loop {
            let mut answer = env.expert_action().expect("an episode is running");
            if (noise.next_u64() as f64 / u64::MAX as f64) < epsilon {
                answer = space[noise.below(space.len() as u64) as usize].clone();
            }
            let outcome = env.step(&[ContentBlock::Text { text: answer }]).expect("step");
            if outcome.terminated || outcome.truncated {
                successes += u64::from(success_of(&outcome.feedback.episode) == Some(true));
                break;
            }
        }
        assert_eq!(env.expert_action(), None, "no expert action once the episode is over");
    }
    successes as f64 / n as f64
}

#[test]
fn expert_action_drives_the_env() {
    let n = if cfg!(debug_assertions) { 100 } else { 500 };
    assert_eq!(env_success_rate(n, 0.0), 1.0);
    assert!(env_success_rate(n, 0.2) >= 0.9);
}
