//! A cost-to-go estimate: about how many actions the remaining acts of a mission still need.
//! The env's `progress` metric is "this step lowered the estimate".
//!
//! Each act becomes one or two *legs*, each leg "reach a pose that faces one of these cells, then
//! spend so many actions there" (e.g. open a locked door without its key: face the key and pick it
//! up, then face the door and toggle). One Dijkstra search over (leg, position, direction) finds
//! the cheapest way through all legs in order, with turns and steps costing 1 and walking through a
//! closed door (or a locked one while carrying its key) costing 1 more for the toggle.
//!
//! It is exact for the missions the task generator builds when nothing is in the way, and an
//! estimate otherwise: it sees the world as it is now (an object picked up in an earlier leg still
//! blocks later legs), charges one action for putting down an unwanted object in hand, and plans a
//! locked door's key by the colour of the first matching locked door.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::mission::{Act, ObjDesc, ObjType};
use super::world::{Cell, Color, Dir, DoorState, ObjectKind, Pos, World};

/// What the agent holds at some point of the plan, as far as the plan knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    kind: Option<ObjectKind>,
    color: Option<Color>,
}

impl Held {
    fn from_desc(d: &ObjDesc) -> Held {
        let kind = match d.kind {
            Some(ObjType::Key) => Some(ObjectKind::Key),
            Some(ObjType::Ball) => Some(ObjectKind::Ball),
            Some(ObjType::Box) => Some(ObjectKind::Box),
            Some(ObjType::Door) | None => None,
        };
        Held { kind, color: d.color }
    }

    /// Surely matches `d` (an unknown kind or colour does not count as a match).
    fn matches(&self, d: &ObjDesc) -> bool {
        match (self.kind, self.color) {
            (Some(kind), Some(color)) => d.matches(kind.into(), color),
            _ => false,
        }
    }

    fn key_color(&self) -> Option<Color> {
        if self.kind == Some(ObjectKind::Key) {
            self.color
        } else {
            None
        }
    }
}

/// One leg: completing costs `finish[cell]` more actions once the agent faces `cell`.
struct Leg {
    finish: Vec<Option<u32>>,
    /// The colour of the key in hand while walking this leg (locked doors of it can be passed).
    key: Option<Color>,
}

/// Estimated actions to complete `acts` (the mission's remaining acts, in order) from the current
/// state; `Some(0)` when nothing remains, `None` when the plan finds no way.
pub fn remaining_cost(world: &World, acts: &[Act]) -> Option<u32> {
    let legs = legs_for(world, acts)?;
    search(world, &legs)
}

fn legs_for(world: &World, acts: &[Act]) -> Option<Vec<Leg>> {
    let cells = (world.width() * world.height()) as usize;
    let index = |p: Pos| (p.y * world.width() + p.x) as usize;
    let mut held: Option<Held> = world.carrying().map(|o| Held { kind: Some(o.kind), color: Some(o.color) });
    let mut legs = Vec::new();
    // A leg that completes on facing any cell satisfying `pred`, for `cost` more actions.
    let leg = |pred: &dyn Fn(Pos, &Cell) -> Option<u32>, key: Option<Color>| -> Option<Leg> {
        let mut finish = vec![None; cells];
        let mut any = false;
        for pos in world.positions() {
            if let Some(cost) = pred(pos, world.cell(pos)) {
                finish[index(pos)] = Some(cost);
                any = true;
            }
        }
        any.then_some(Leg { finish, key })
    };
    for act in acts {
        let key = held.and_then(|h| h.key_color());
        let hands_full = u32::from(held.is_some());
        match act {
            Act::GoTo(d) => legs.push(leg(&|_, c| d.matches_cell(c).then_some(0), key)?),
            Act::PickUp(d) => {
                let on_grid =
                    leg(&|_, c| matches!(c, Cell::Object(o) if d.matches_object(o)).then_some(1 + hands_full), key);
                match on_grid {
                    Some(l) => legs.push(l),
                    // The only match is in hand: put it down and pick it up again.
                    None if held.is_some_and(|h| h.matches(d)) => {
                        legs.push(leg(&|_, c| (*c == Cell::Floor).then_some(2), key)?)
                    }
                    None => return None,
                }
                held = Some(Held::from_desc(d));
            }
            Act::Open(d) => {
                let openable = |c: &Cell| match c {
                    Cell::Door { color, state } if d.matches(ObjType::Door, *color) => match state {
                        DoorState::Closed => Some(1),
                        DoorState::Open => Some(2),
                        DoorState::Locked if key == Some(*color) => Some(1),
                        DoorState::Locked => None,
                    },
                    _ => None,
                };
                if let Some(l) = leg(&|_, c| openable(c), key) {
                    legs.push(l);
                    continue;
                }
                // Every matching door is locked: fetch the key of the first one's colour.
                let color = world.positions().find_map(|p| match world.cell(p) {
                    Cell::Door { color, .. } if d.matches(ObjType::Door, *color) => Some(*color),
                    _ => None,
                })?;
                let is_key = |c: &Cell| matches!(c, Cell::Object(o) if o.kind == ObjectKind::Key && o.color == color);
                legs.push(leg(&|_, c| is_key(c).then_some(1 + hands_full), key)?);
                let door = |c: &Cell| matches!(c, Cell::Door { color: dc, .. } if *dc == color);
                legs.push(leg(&|_, c| door(c).then_some(1), Some(color))?);
                held = Some(Held { kind: Some(ObjectKind::Key), color: Some(color) });
            }
            Act::PutNext(a, b) => {
                if !held.is_some_and(|h| h.matches(a)) {
                    let pick = |c: &Cell| matches!(c, Cell::Object(o) if a.matches_object(o));
                    legs.push(leg(&|_, c| pick(c).then_some(1 + hands_full), key)?);
                    held = Some(Held::from_desc(a));
                }
                let key = held.and_then(|h| h.key_color());
                let beside_target = |p: Pos| p.neighbours().iter().any(|&n| b.matches_cell(world.cell(n)));
                legs.push(leg(&|p, c| (*c == Cell::Floor && beside_target(p)).then_some(1), key)?);
                held = None;
            }
        }
    }
    Some(legs)
}

/// Dijkstra over (leg, position, direction); the answer is the cost of finishing the last leg.
/// Finishing the last leg leads to one terminal "leg" `legs.len()`, whose first pop is the answer.
fn search(world: &World, legs: &[Leg]) -> Option<u32> {
    if legs.is_empty() {
        return Some(0);
    }
    let (w, h) = (world.width(), world.height());
    let cells = (w * h) as usize;
    let state = |leg: usize, p: Pos, d: Dir| (leg * cells + (p.y * w + p.x) as usize) * 4 + d.index();
    let mut best = vec![u32::MAX; legs.len() * cells * 4];
    let mut heap = BinaryHeap::new();
    let (pos, dir) = (world.agent_pos(), world.agent_dir());
    best[state(0, pos, dir)] = 0;
    heap.push(Reverse((0u32, 0usize, pos, dir)));
    while let Some(Reverse((cost, leg, pos, dir))) = heap.pop() {
        if leg == legs.len() {
            return Some(cost);
        }
        if cost > best[state(leg, pos, dir)] {
            continue;
        }
        let mut next = vec![(cost + 1, leg, pos, dir.left()), (cost + 1, leg, pos, dir.right())];
        let front = pos.step(dir, 1);
        if world.in_bounds(front) {
            if let Some(finish) = legs[leg].finish[(front.y * w + front.x) as usize] {
                next.push((cost + finish, leg + 1, pos, dir));
            }
            let walk = match world.cell(front) {
                c if c.is_passable() => Some(1),
                Cell::Door { state: DoorState::Closed, .. } => Some(2),
                Cell::Door { state: DoorState::Locked, color } if legs[leg].key == Some(*color) => Some(2),
                _ => None,
            };
            if let Some(walk) = walk {
                next.push((cost + walk, leg, front, dir));
            }
        }
        for (c, l, p, d) in next {
            if l == legs.len() {
                heap.push(Reverse((c, l, p, d)));
            } else if c < best[state(l, p, d)] {
                best[state(l, p, d)] = c;
                heap.push(Reverse((c, l, p, d)));
            }
        }
    }
    None
}
