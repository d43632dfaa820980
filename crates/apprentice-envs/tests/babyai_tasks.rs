//! Task generation: determinism (golden tasks), the five families, the colour–object split, and
//! that every task can be solved.

use std::collections::BTreeSet;

use apprentice_envs::babyai::mission::{Act, ObjType, Status, Verifier};
use apprentice_envs::babyai::plan::remaining_cost;
use apprentice_envs::babyai::tasks::{
    generate, is_held_out, mission_pairs, Family, Task, TaskConfig, TaskError, HELD_OUT, MAX_DISTRACTORS,
    TASKS_PER_SPLIT,
};
use apprentice_envs::babyai::world::{Action, Cell, Color, Dir, DoorState, ObjectKind, Pos, World};
use apprentice_envs::{Split, TaskId};

fn task(split: Split, index: u64) -> Task {
    generate(TaskId { split, index }, &TaskConfig::default()).expect("task generates")
}

/// Every key, ball, box and door in the world, as (kind, colour).
fn things(world: &World) -> Vec<(ObjType, Color)> {
    world
        .positions()
        .filter_map(|p| match world.cell(p) {
            Cell::Object(o) => Some((o.kind.into(), o.color)),
            Cell::Door { color, .. } => Some((ObjType::Door, *color)),
            _ => None,
        })
        .collect()
}

/// Plays a task greedily on the plan's cost-to-go: each step takes the action that completes the
/// mission or lowers the estimate most. Returns the verifier's status and the steps used.
fn greedy(task: &Task) -> (Status, u32) {
    let mut world = task.world.clone();
    let mut verifier = Verifier::new(&task.instr);
    for step in 1..=task.max_steps {
        let mut best: Option<(u32, Action)> = None;
        for action in Action::OFFERED {
            let (mut w, mut v) = (world.clone(), verifier.clone());
            let effect = w.step(action);
            let cost = match v.update(&w, &effect) {
                Status::Success => 0,
                Status::Failure => continue,
                Status::InProgress => match remaining_cost(&w, v.remaining()) {
                    Some(c) => c + 1,
                    None => continue,
                },
            };
            if best.is_none_or(|(b, _)| cost < b) {
                best = Some((cost, action));
            }
        }
        let Some((_, action)) = best else { return (Status::Failure, step) };
        let effect = world.step(action);
        let status = verifier.update(&world, &effect);
        if status != Status::InProgress {
            return (status, step);
        }
    }
    (Status::InProgress, task.max_steps)
}

#[test]
fn golden_tasks_never_change() {
    // Pinned: the same (split, index) must give the same task on every machine, forever.
    let golden: &[(&str, &str, (i32, i32), Dir)] = &[
        ("train/0", "go to the yellow ball", (5, 3), Dir::West),
        ("train/1", "pick up the red key", (2, 5), Dir::North),
        ("train/2", "open the green door", (5, 2), Dir::South),
        ("train/3", "put the red ball next to the green ball", (5, 4), Dir::West),
        ("train/4", "pick up the blue ball, then go to the red ball", (4, 5), Dir::South),
        ("train/999999", "go to the blue ball after you pick up the grey key", (1, 6), Dir::North),
        ("test/0", "go to the green box", (2, 2), Dir::East),
        ("test/1", "pick up the green ball", (5, 1), Dir::West),
        ("test/2", "open the red door", (12, 5), Dir::South),
        ("test/3", "put the grey box next to the yellow key", (1, 5), Dir::East),
        ("test/4", "pick up the blue box, then go to the purple key", (5, 1), Dir::South),
        ("test/999999", "pick up the purple ball, then go to the grey box", (1, 2), Dir::East),
    ];
    for &(id, mission, (x, y), dir) in golden {
        let id: TaskId = id.parse().unwrap();
        let t = generate(id, &TaskConfig::default()).unwrap();
        assert_eq!(
            (t.mission().as_str(), t.world.agent_pos(), t.world.agent_dir()),
            (mission, Pos::new(x, y), dir),
            "{id}"
        );
    }
    // And the whole layout of one, object by object.
    assert_eq!(
        task(Split::Train, 3).world.render_ascii(),
        "WWWWWWWWWWWWWWWW\n\
         WW............WW\n\
         WW........Ag..WW\n\
         WW............WW\n\
         WW........<<..WW\n\
         WW............WW\n\
         WW......Ar....WW\n\
         WWWWWWWWWWWWWWWW\n"
    );
}

#[test]
fn generation_is_deterministic_and_tasks_differ() {
    for index in 0..50 {
        assert_eq!(task(Split::Train, index), task(Split::Train, index));
    }
    let worlds: BTreeSet<String> = (0..200).map(|i| task(Split::Train, i).world.render_ascii()).collect();
    assert!(worlds.len() >= 195, "only {} distinct layouts in 200 tasks", worlds.len());
    assert_ne!(task(Split::Train, 10).world, task(Split::Test, 10).world, "splits draw different tasks");
}

#[test]
fn the_family_is_the_index_modulo_five_with_its_step_budget() {
    for index in 0..100 {
        let t = task(Split::Test, index);
        assert_eq!(t.family, Family::ALL[(index % 5) as usize]);
        let acts = t.instr.acts_in_order();
        let (max_steps, shape_ok) = match t.family {
            Family::GoTo => (64, matches!(acts[..], [Act::GoTo(_)])),
            Family::PickUp => (64, matches!(acts[..], [Act::PickUp(_)])),
            Family::Open => (128, matches!(acts[..], [Act::Open(_)])),
            Family::PutNext => (128, matches!(acts[..], [Act::PutNext(..)])),
            Family::PickUpThenGoTo => (128, matches!(acts[..], [Act::PickUp(_), Act::GoTo(_)])),
        };
        assert_eq!(t.max_steps, max_steps, "{}", t.id);
        assert!(shape_ok, "{}: {}", t.id, t.mission());
    }
}

#[test]
fn both_sequence_forms_appear() {
    let missions: Vec<String> = (0..100).map(|i| task(Split::Train, i * 5 + 4).mission()).collect();
    assert!(missions.iter().any(|m| m.contains(", then ")));
    assert!(missions.iter().any(|m| m.contains(" after you ")));
}

#[test]
fn layouts_have_the_documented_rooms_and_object_counts() {
    for index in 0..200 {
        let t = task(Split::Train, index);
        let w = &t.world;
        let objects = w.positions().filter(|&p| matches!(w.cell(p), Cell::Object(_))).count();
        match t.family {
            Family::Open => {
                assert_eq!((w.width(), w.height()), (15, 8), "{}", t.id);
                let doors: Vec<Pos> = w
                    .positions()
                    .filter(|&p| matches!(w.cell(p), Cell::Door { state: DoorState::Locked, .. }))
                    .collect();
                assert_eq!(doors.len(), 1, "{}", t.id);
                assert_eq!(doors[0].x, 7, "the door is in the shared wall");
                let Cell::Door { color, .. } = *w.cell(doors[0]) else { unreachable!() };
                // The key of the door's colour is on the agent's side.
                let agent_left = w.agent_pos().x < 7;
                let key = w
                    .positions()
                    .find(|&p| matches!(w.cell(p), Cell::Object(o) if o.kind == ObjectKind::Key && o.color == color));
                assert!(key.is_some_and(|k| (k.x < 7) == agent_left), "{}", t.id);
                assert_eq!(objects, 1, "{}: only the key", t.id);
            }
            family => {
                assert_eq!((w.width(), w.height()), (8, 8), "{}", t.id);
                let needed = if matches!(family, Family::GoTo | Family::PickUp) { 1 } else { 2 };
                assert_eq!(objects, needed, "{}", t.id);
            }
        }
        assert!(w.carrying().is_none());
    }
    let config = TaskConfig { distractors: 5 };
    for index in 0..50 {
        let t = generate(TaskId { split: Split::Train, index }, &config).unwrap();
        let w = &t.world;
        let objects = w.positions().filter(|&p| matches!(w.cell(p), Cell::Object(_))).count();
        let needed = match t.family {
            Family::GoTo | Family::PickUp | Family::Open => 1,
            _ => 2,
        };
        assert_eq!(objects, needed + 5, "{}", t.id);
        // Every object has its own colour-kind pair, so "the" is always right.
        let pairs = things(w);
        assert_eq!(pairs.iter().collect::<BTreeSet<_>>().len(), pairs.len(), "{}", t.id);
    }
}

#[test]
fn go_to_never_starts_facing_its_target() {
    for index in (0..2000).step_by(5) {
        let t = task(Split::Train, index);
        let mut v = Verifier::new(&t.instr);
        assert_eq!(
            v.update(&t.world, &apprentice_envs::babyai::world::ActionEffect::Done),
            Status::InProgress,
            "{}",
            t.id
        );
    }
}

#[test]
fn train_never_shows_a_held_out_pair_and_test_does() {
    assert_eq!(HELD_OUT.len(), 4, "a sixth of the 24 colour-kind pairs");
    for config in [TaskConfig::default(), TaskConfig { distractors: MAX_DISTRACTORS }] {
        for index in 0..2000 {
            let t = generate(TaskId { split: Split::Train, index }, &config).unwrap();
            assert!(!t.held_out, "{}", t.id);
            for (kind, color) in things(&t.world).into_iter().chain(mission_pairs(&t.instr)) {
                assert!(!is_held_out(kind, color), "{}: {color:?} {kind:?} in train", t.id);
            }
        }
    }
    // In test, every held-out pair turns up as a mission target.
    let mut seen = BTreeSet::new();
    let mut flagged = 0;
    for index in 0..2000 {
        let t = task(Split::Test, index);
        let targets: Vec<_> = mission_pairs(&t.instr).into_iter().filter(|&(k, c)| is_held_out(k, c)).collect();
        assert_eq!(t.held_out, !targets.is_empty(), "{}", t.id);
        flagged += usize::from(t.held_out);
        seen.extend(targets);
    }
    assert_eq!(seen.len(), HELD_OUT.len(), "held-out targets seen in test: {seen:?}");
    assert!((150..800).contains(&flagged), "{flagged} of 2000 test tasks name a held-out pair");
}

#[test]
fn every_task_is_solvable() {
    for split in [Split::Train, Split::Test] {
        for config in [TaskConfig::default(), TaskConfig { distractors: MAX_DISTRACTORS }] {
            for index in 0..1000 {
                let t = generate(TaskId { split, index }, &config).unwrap();
                let v = Verifier::new(&t.instr);
                let cost = remaining_cost(&t.world, v.remaining());
                assert!(cost.is_some_and(|c| c > 0 && c < t.max_steps), "{}: cost {cost:?}", t.id);
            }
        }
    }
}

#[test]
fn a_greedy_player_on_the_plan_solves_every_benchmark_task() {
    let mut steps_by_family = [0u32; 5];
    for split in [Split::Train, Split::Test] {
        for index in 0..500 {
            let t = task(split, index);
            let (status, steps) = greedy(&t);
            assert_eq!(
                status,
                Status::Success,
                "{}: {} ({steps} steps)\n{}",
                t.id,
                t.mission(),
                t.world.render_ascii()
            );
            steps_by_family[(index % 5) as usize] += steps;
        }
    }
    // Sanity of the step budgets: on average a task takes well under its limit.
    for (family, total) in Family::ALL.iter().zip(steps_by_family) {
        let mean = f64::from(total) / 200.0;
        assert!(mean < f64::from(family.max_steps()) / 3.0, "{}: mean {mean} steps", family.name());
    }
}

#[test]
fn bad_requests_are_refused() {
    let config = TaskConfig::default();
    assert_eq!(
        generate(TaskId { split: Split::Train, index: TASKS_PER_SPLIT }, &config),
        Err(TaskError::IndexOutOfRange(TASKS_PER_SPLIT))
    );
    assert_eq!(
        generate(TaskId { split: Split::Train, index: 0 }, &TaskConfig { distractors: MAX_DISTRACTORS + 1 }),
        Err(TaskError::TooManyDistractors(MAX_DISTRACTORS + 1))
    );
}
