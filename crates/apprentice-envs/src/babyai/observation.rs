//! The text observation, as BALROG's BabyAI-Text wrapper prints it: one line per visible thing.
//!
//! ```text
//! a wall 2 steps forward
//! a wall 3 steps left
//! a red ball 1 step right and 2 steps forward
//! You carry a blue key
//! ```
//!
//! Line order (fixed so identical states give identical text):
//! 1. walls, only the nearest visible wall along each of three rays from the agent, in the order
//!    forward, left, right; a ray stops at the first cell it cannot see or see through;
//! 2. keys, balls, boxes, doors and goals anywhere in the visible view, nearest first by walking
//!    distance (forward + sideways steps), then fewer steps forward, then from left to right;
//! 3. "You carry …" when the agent holds something.
//!
//! Offsets: an object straight ahead gets "K steps forward", one in the agent's own row "K steps
//! left|right", any other "J steps right|left and K steps forward"; one step is singular. Doors
//! say their state ("a locked red door", "an open grey door"). If nothing at all is visible the
//! observation is the single line `nothing in sight`.

use super::world::{Cell, DoorState, World, VIEW_HALF, VIEW_SIZE};

pub const NOTHING_IN_SIGHT: &str = "nothing in sight";

/// The observation text for the agent's current view, lines joined by `\n`.
pub fn describe(world: &World) -> String {
    let lines = describe_lines(world);
    if lines.is_empty() {
        NOTHING_IN_SIGHT.to_string()
    } else {
        lines.join("\n")
    }
}

/// The observation lines in the documented order (empty when nothing is in sight).
pub fn describe_lines(world: &World) -> Vec<String> {
    let view = world.view();
    let mut lines = Vec::new();

    // Walls along the three rays: (name, step forward, step right, reach).
    let rays = [("forward", 1, 0, VIEW_SIZE - 1), ("left", 0, -1, VIEW_HALF), ("right", 0, 1, VIEW_HALF)];
    for (word, df, dr, reach) in rays {
        for k in 1..=reach {
            let Some(cell) = view.get(k * df, k * dr).filter(|c| c.visible) else { break };
            match world.cell(cell.pos) {
                Cell::Wall => {
                    lines.push(format!("a wall {} {word}", steps(k)));
                    break;
                }
                other if !other.is_transparent() => break,
                _ => {}
            }
        }
    }

    let mut things: Vec<(i32, i32, String)> = Vec::new();
    for cell in view.cells() {
        if !cell.visible || (cell.forward == 0 && cell.right == 0) {
            continue;
        }
        let name = match world.cell(cell.pos) {
            Cell::Object(object) => format!("a {} {}", object.color.name(), object.kind.name()),
            Cell::Door { color, state: DoorState::Open } => format!("an open {} door", color.name()),
            Cell::Door { color, state } => format!("a {} {} door", state.name(), color.name()),
            Cell::Goal => "a goal".to_string(),
            Cell::Floor | Cell::Wall => continue,
        };
        things.push((cell.forward, cell.right, format!("{name} {}", offset(cell.forward, cell.right))));
    }
    things.sort_by_key(|&(forward, right, _)| (forward + right.abs(), forward, right));
    lines.extend(things.into_iter().map(|(_, _, line)| line));

    if let Some(object) = world.carrying() {
        lines.push(format!("You carry a {} {}", object.color.name(), object.kind.name()));
    }
    lines
}

/// "1 step" / "3 steps".
fn steps(k: i32) -> String {
    if k == 1 {
        "1 step".to_string()
    } else {
        format!("{k} steps")
    }
}

/// Where a thing lies relative to the agent, in BALROG's words.
fn offset(forward: i32, right: i32) -> String {
    let side = if right > 0 { "right" } else { "left" };
    match (forward, right) {
        (f, 0) => format!("{} forward", steps(f)),
        (0, r) => format!("{} {side}", steps(r.abs())),
        (f, r) => format!("{} {side} and {} forward", steps(r.abs()), steps(f)),
    }
}
