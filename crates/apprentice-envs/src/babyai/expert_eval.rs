//! Measures the scripted expert directly on the world (no recording): success and return per task
//! family under ε-noise. The expert's acceptance test and `apprentice bench expert` both use it.

use serde::Serialize;

use super::expert::Expert;
use super::mission::{Status, Verifier};
use super::rng::Rng;
use super::tasks::{generate, Family, TaskConfig, TaskError};
use super::world::Action;
use crate::{Split, TaskId};

/// How one episode ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertEpisode {
    pub success: bool,
    /// Ended early because something the mission names is gone (noise toggled a box away).
    pub impossible: bool,
    pub reward: f64,
    pub steps: u32,
}

/// Runs the expert on task `id`, replacing its action by a uniformly random offered one with
/// probability `epsilon` (drawn from `noise`).
pub fn run_expert(id: TaskId, config: &TaskConfig, epsilon: f64, noise: &mut Rng) -> Result<ExpertEpisode, TaskError> {
    let task = generate(id, config)?;
    let mut world = task.world.clone();
    let mut verifier = Verifier::new(&task.instr);
    let mut expert = Expert::new(&world);
    for step in 1..=task.max_steps {
        let mut action = expert.act(&world, &verifier);
        if epsilon > 0.0 && (noise.next_u64() as f64 / u64::MAX as f64) < epsilon {
            action = Action::OFFERED[noise.below(Action::OFFERED.len() as u64) as usize];
        }
        let effect = world.step(action);
        expert.observe(&world);
        match verifier.update(&world, &effect) {
            Status::Success => {
                let reward = super::success_reward(step, task.max_steps);
                return Ok(ExpertEpisode { success: true, impossible: false, reward, steps: step });
            }
            Status::Failure => return Ok(ExpertEpisode { success: false, impossible: true, reward: 0.0, steps: step }),
            Status::InProgress => {}
        }
    }
    Ok(ExpertEpisode { success: false, impossible: false, reward: 0.0, steps: task.max_steps })
}

/// Totals over many episodes of one family at one ε.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertStats {
    pub family: &'static str,
    pub epsilon: f64,
    pub episodes: u64,
    pub successes: u64,
    pub impossible: u64,
    pub total_reward: f64,
    pub total_steps: u64,
}

impl ExpertStats {
    pub fn success_rate(&self) -> f64 {
        self.successes as f64 / self.episodes.max(1) as f64
    }
    pub fn mean_return(&self) -> f64 {
        self.total_reward / self.episodes.max(1) as f64
    }
    pub fn mean_steps(&self) -> f64 {
        self.total_steps as f64 / self.episodes.max(1) as f64
    }
    /// Episodes that ran out of steps.
    pub fn timed_out(&self) -> u64 {
        self.episodes - self.successes - self.impossible
    }
}

/// `n` test-split tasks of `family` (indices `family + 5k`), noise seeded per (family, ε) so a
/// measurement repeats exactly.
pub fn evaluate_expert(family: Family, n: u64, epsilon: f64, config: &TaskConfig) -> Result<ExpertStats, TaskError> {
    let offset = Family::ALL.iter().position(|&f| f == family).unwrap_or(0) as u64;
    let mut noise = Rng::new(0xE5E5 ^ (offset << 8) ^ (epsilon * 1000.0) as u64);
    let mut stats = ExpertStats {
        family: family.name(),
        epsilon,
        episodes: 0,
        successes: 0,
        impossible: 0,
        total_reward: 0.0,
        total_steps: 0,
    };
    for k in 0..n {
        let id = TaskId { split: Split::Test, index: offset + 5 * k };
        let episode = run_expert(id, config, epsilon, &mut noise)?;
        stats.episodes += 1;
        stats.successes += u64::from(episode.success);
        stats.impossible += u64::from(episode.impossible);
        stats.total_reward += episode.reward;
        stats.total_steps += u64::from(episode.steps);
    }
    Ok(stats)
}

/// The family × ε table, in Markdown.
pub fn stats_table(rows: &[ExpertStats]) -> String {
    let mut out = String::from(
        "| family | ε | success | mean return | mean steps | made impossible | timed out |\n|---|---|---|---|---|---|---|\n",
    );
    for s in rows {
        out.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.1} | {} | {} |\n",
            s.family,
            s.epsilon,
            s.success_rate(),
            s.mean_return(),
            s.mean_steps(),
            s.impossible,
            s.timed_out()
        ));
    }
    out
}
