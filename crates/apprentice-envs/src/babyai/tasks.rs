//! Task generation: every task is determined by its split and index alone (plus the distractor
//! count of the env's configuration), through our own seeded RNG.
//!
//! The five families of BabyAI's "mixed local" suite, chosen by `index % 5`:
//!
//! | index % 5 | family           | mission                                          | max steps |
//! |-----------|------------------|--------------------------------------------------|-----------|
//! | 0         | goto             | go to the X                                      | 64        |
//! | 1         | pickup           | pick up the X                                    | 64        |
//! | 2         | open             | open the C door                                  | 128       |
//! | 3         | putnext          | put the X next to the Y                          | 128       |
//! | 4         | pickup-then-goto | pick up the X, then go to the Y                  | 128       |
//! |           |                  | or: go to the Y after you pick up the X          |           |
//!
//! Layouts: one 8×8 room holding the mission's objects (one for goto and pickup, two for putnext
//! and pickup-then-goto); for open, two 8×8 rooms side by side sharing a wall (15×8), a locked
//! door of colour C in that wall, and the key of colour C in the agent's room (distractors go in
//! either room). A goto task never starts with the agent already facing its target.
//! "8×8" counts the walls, as BabyAI's `room_size` does, so a room has 6×6 free cells. A harder
//! variant adds `distractors` more objects (BabyAI uses up to 8); every object in a task has a
//! distinct colour–kind pair, so descriptors are always "the …".
//!
//! Train/test split: one colour per kind is held out of the train split entirely — never a target,
//! never a distractor — and appears only in test: yellow key, purple ball, green box, grey door
//! (4 of the 24 colour–kind pairs, a sixth). Each colour and each kind still appears in train; the
//! open family's door and key share a colour, so in train that colour is never yellow or grey. Test
//! tasks draw from all 24 pairs, so a test task names a held-out pair about as often as chance
//! gives; [`Task::held_out`] marks those so evaluations can report them apart.
//!
//! Every generated task is checked to be solvable: each object the mission needs has a free
//! neighbour the agent can walk to (for the open family, the key on the agent's side and the cell
//! before the door). A layout that fails is redrawn from the same seeded stream.

use super::mission::{Act, Instr, ObjDesc, ObjType};
use super::rng::Rng;
use super::world::{Cell, Color, Dir, DoorState, Object, ObjectKind, Pos, World};
use crate::{Split, TaskId};

/// Tasks per split. Any index below it is a valid task.
pub const TASKS_PER_SPLIT: u64 = 1_000_000;
/// Room side including its walls, as BabyAI's `room_size`.
pub const ROOM_SIZE: i32 = 8;
/// Layout attempts before giving up (never reached in practice: 1–10 objects in 36 cells).
const MAX_ATTEMPTS: usize = 1000;

/// The colour–kind pairs that appear only in the test split.
pub const HELD_OUT: [(ObjType, Color); 4] = [
    (ObjType::Key, Color::Yellow),
    (ObjType::Ball, Color::Purple),
    (ObjType::Box, Color::Green),
    (ObjType::Door, Color::Grey),
];

pub fn is_held_out(kind: ObjType, color: Color) -> bool {
    HELD_OUT.contains(&(kind, color))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    GoTo,
    PickUp,
    Open,
    PutNext,
    PickUpThenGoTo,
}

impl Family {
    /// In index order: task `i` belongs to `ALL[i % 5]`.
    pub const ALL: [Family; 5] = [Family::GoTo, Family::PickUp, Family::Open, Family::PutNext, Family::PickUpThenGoTo];

    pub fn of_index(index: u64) -> Family {
        Family::ALL[(index % Family::ALL.len() as u64) as usize]
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::GoTo => "goto",
            Family::PickUp => "pickup",
            Family::Open => "open",
            Family::PutNext => "putnext",
            Family::PickUpThenGoTo => "pickup-then-goto",
        }
    }

    pub fn max_steps(self) -> u32 {
        match self {
            Family::GoTo | Family::PickUp => 64,
            Family::Open | Family::PutNext | Family::PickUpThenGoTo => 128,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskConfig {
    /// Extra objects besides the ones the mission needs (0 in the LLM benchmarks).
    pub distractors: usize,
}

/// Most distractors a task may ask for: with the mission's two objects this uses 10 of the 15
/// colour–kind pairs train allows.
pub const MAX_DISTRACTORS: usize = 8;

/// One generated task: its world at the start, its mission and its step budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: TaskId,
    pub family: Family,
    pub instr: Instr,
    pub world: World,
    pub max_steps: u32,
    /// The mission names a held-out colour–kind pair (only ever in test).
    pub held_out: bool,
}

impl Task {
    pub fn mission(&self) -> String {
        self.instr.text()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskError {
    #[error("task index {0} is out of range (0..{TASKS_PER_SPLIT})")]
    IndexOutOfRange(u64),
    #[error("at most {MAX_DISTRACTORS} distractors are supported, not {0}")]
    TooManyDistractors(usize),
    #[error("could not lay out task {0} in {MAX_ATTEMPTS} attempts")]
    NoLayout(TaskId),
}

/// Builds task `id`. The same `(id, config)` gives the same task on every machine.
pub fn generate(id: TaskId, config: &TaskConfig) -> Result<Task, TaskError> {
    if id.index >= TASKS_PER_SPLIT {
        return Err(TaskError::IndexOutOfRange(id.index));
    }
    if config.distractors > MAX_DISTRACTORS {
        return Err(TaskError::TooManyDistractors(config.distractors));
    }
    let split_tag: u64 = match id.split {
        Split::Train => 1,
        Split::Test => 2,
    };
    // Mix split, index and distractor count into one seed; SplitMix64's output function spreads
    // neighbouring inputs apart, so tasks i and i+1 are unrelated.
    let seed = Rng::new(id.index ^ (split_tag << 40) ^ ((config.distractors as u64) << 48)).next_u64();
    let mut rng = Rng::new(seed);
    let family = Family::of_index(id.index);
    for _ in 0..MAX_ATTEMPTS {
        let attempt = match family {
            Family::Open => layout_open(&mut rng, id.split, config.distractors),
            _ => layout_one_room(&mut rng, family, id.split, config.distractors),
        };
        if let Some((world, instr)) = attempt {
            let held_out = mission_pairs(&instr).iter().any(|&(kind, color)| is_held_out(kind, color));
            return Ok(Task { id, family, instr, world, max_steps: family.max_steps(), held_out });
        }
    }
    Err(TaskError::NoLayout(id))
}

/// The colour–kind pairs the mission names (descriptors without colour or kind name none).
pub fn mission_pairs(instr: &Instr) -> Vec<(ObjType, Color)> {
    let mut descs = Vec::new();
    for act in instr.acts_in_order() {
        match act {
            Act::GoTo(d) | Act::PickUp(d) | Act::Open(d) => descs.push(d),
            Act::PutNext(a, b) => descs.extend([a, b]),
        }
    }
    descs.iter().filter_map(|d| Some((d.kind?, d.color?))).collect()
}

/// Distinct colour–kind pairs for carriable objects, drawn from those the split allows.
fn draw_objects(rng: &mut Rng, split: Split, count: usize, exclude: &[(ObjectKind, Color)]) -> Vec<Object> {
    let mut pool: Vec<(ObjectKind, Color)> = ObjectKind::ALL
        .into_iter()
        .flat_map(|kind| Color::ALL.into_iter().map(move |color| (kind, color)))
        .filter(|&(kind, color)| split == Split::Test || !is_held_out(kind.into(), color))
        .filter(|pair| !exclude.contains(pair))
        .collect();
    rng.shuffle(&mut pool);
    pool.into_iter().take(count).map(|(kind, color)| Object::new(kind, color)).collect()
}

/// Free floor cells inside the rectangle `x0..=x1, y0..=y1`, not in `keep_free`.
fn free_cells(world: &World, (x0, y0, x1, y1): (i32, i32, i32, i32), keep_free: &[Pos]) -> Vec<Pos> {
    let mut cells = Vec::new();
    for y in y0..=y1 {
        for x in x0..=x1 {
            let pos = Pos::new(x, y);
            if *world.cell(pos) == Cell::Floor && !keep_free.contains(&pos) {
                cells.push(pos);
            }
        }
    }
    cells
}

/// Places `object` on a random free cell of `area`; returns where, or `None` when the area is full.
fn place(
    rng: &mut Rng,
    world: &mut World,
    object: Object,
    area: (i32, i32, i32, i32),
    keep_free: &[Pos],
) -> Option<Pos> {
    let pos = *rng.choose(&free_cells(world, area, keep_free))?;
    world.set(pos, Cell::Object(object)).ok()?;
    Some(pos)
}

/// Puts the agent on a random free cell of `area` facing a random direction.
fn place_agent(rng: &mut Rng, world: &mut World, area: (i32, i32, i32, i32)) -> Option<()> {
    let pos = *rng.choose(&free_cells(world, area, &[]))?;
    let dir = Dir::ALL[rng.below(4) as usize];
    world.place_agent(pos, dir).ok()
}

/// Which cells the agent can walk to from where it stands (row-major, `y * width + x`).
pub fn reachable(world: &World) -> Vec<bool> {
    let (w, h) = (world.width(), world.height());
    let mut seen = vec![false; (w * h) as usize];
    let start = world.agent_pos();
    let mut queue = std::collections::VecDeque::from([start]);
    seen[(start.y * w + start.x) as usize] = true;
    while let Some(pos) = queue.pop_front() {
        for next in pos.neighbours() {
            if world.in_bounds(next) && world.cell(next).is_passable() && !seen[(next.y * w + next.x) as usize] {
                seen[(next.y * w + next.x) as usize] = true;
                queue.push_back(next);
            }
        }
    }
    seen
}

/// The agent can stand next to `pos` (and so face it).
fn approachable(world: &World, seen: &[bool], pos: Pos) -> bool {
    pos.neighbours().iter().any(|&n| world.in_bounds(n) && seen[(n.y * world.width() + n.x) as usize])
}

fn desc(object: &Object) -> ObjDesc {
    ObjDesc::the(object.color, object.kind.into())
}

/// Interior of the single room.
const ROOM: (i32, i32, i32, i32) = (1, 1, ROOM_SIZE - 2, ROOM_SIZE - 2);

fn layout_one_room(rng: &mut Rng, family: Family, split: Split, distractors: usize) -> Option<(World, Instr)> {
    let mut world = World::walled(ROOM_SIZE, ROOM_SIZE);
    let needed = match family {
        Family::GoTo | Family::PickUp => 1,
        _ => 2,
    };
    let objects = draw_objects(rng, split, needed + distractors, &[]);
    let mut positions = Vec::with_capacity(objects.len());
    for object in &objects {
        positions.push(place(rng, &mut world, object.clone(), ROOM, &[])?);
    }
    place_agent(rng, &mut world, ROOM)?;
    let seen = reachable(&world);
    let (a, pos_a) = (objects.first()?, *positions.first()?);
    if !approachable(&world, &seen, pos_a) {
        return None;
    }
    let instr = match family {
        Family::GoTo => {
            // Facing the target at the start would complete the mission with any first action.
            if world.front_pos() == pos_a {
                return None;
            }
            Instr::Single(Act::GoTo(desc(a)))
        }
        Family::PickUp => Instr::Single(Act::PickUp(desc(a))),
        Family::PutNext => {
            let (b, pos_b) = (objects.get(1)?, *positions.get(1)?);
            // Already adjacent would make the mission a pick-up-and-drop-back.
            if pos_a.is_next_to(pos_b) {
                return None;
            }
            let drop_spot =
                pos_b.neighbours().into_iter().any(|d| *world.cell(d) == Cell::Floor && approachable(&world, &seen, d));
            if !drop_spot {
                return None;
            }
            Instr::Single(Act::PutNext(desc(a), desc(b)))
        }
        Family::PickUpThenGoTo => {
            let (b, pos_b) = (objects.get(1)?, *positions.get(1)?);
            if !approachable(&world, &seen, pos_b) {
                return None;
            }
            let (pick, go) = (Act::PickUp(desc(a)), Act::GoTo(desc(b)));
            if rng.coin() {
                Instr::Then(pick, go)
            } else {
                Instr::After(go, pick)
            }
        }
        Family::Open => return None,
    };
    Some((world, instr))
}

/// Two rooms side by side sharing the wall at x = 7, a locked door in it, the agent and the key
/// of the door's colour in the same room; distractors anywhere.
fn layout_open(rng: &mut Rng, split: Split, distractors: usize) -> Option<(World, Instr)> {
    let wall_x = ROOM_SIZE - 1;
    let mut world = World::walled(2 * ROOM_SIZE - 1, ROOM_SIZE);
    for y in 1..ROOM_SIZE - 1 {
        world.set(Pos::new(wall_x, y), Cell::Wall).ok()?;
    }
    let colors: Vec<Color> = Color::ALL
        .into_iter()
        .filter(|&c| split == Split::Test || !(is_held_out(ObjType::Door, c) || is_held_out(ObjType::Key, c)))
        .collect();
    let color = *rng.choose(&colors)?;
    let door = Pos::new(wall_x, rng.range(1, ROOM_SIZE - 2));
    world.set(door, Cell::Door { color, state: DoorState::Locked }).ok()?;
    let left = (1, 1, wall_x - 1, ROOM_SIZE - 2);
    let right = (wall_x + 1, 1, 2 * ROOM_SIZE - 3, ROOM_SIZE - 2);
    let (home, other) = if rng.coin() { (left, right) } else { (right, left) };
    // Nothing may stand in the doorway's approaches, so the door can always be reached and passed.
    let approaches = [door.step(Dir::West, 1), door.step(Dir::East, 1)];
    let key = Object::key(color);
    let key_pos = place(rng, &mut world, key.clone(), home, &approaches)?;
    for object in draw_objects(rng, split, distractors, &[(ObjectKind::Key, color)]) {
        let area = if rng.coin() { home } else { other };
        place(rng, &mut world, object, area, &approaches)?;
    }
    place_agent(rng, &mut world, home)?;
    let seen = reachable(&world);
    let home_approach = if home == left { approaches[0] } else { approaches[1] };
    let door_reachable = seen[(home_approach.y * world.width() + home_approach.x) as usize];
    if !approachable(&world, &seen, key_pos) || !door_reachable {
        return None;
    }
    Some((world, Instr::Single(Act::Open(ObjDesc::the(color, ObjType::Door)))))
}
