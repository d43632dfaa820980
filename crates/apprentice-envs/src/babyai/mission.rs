//! Missions: the grammar, its text, and the verifier that decides success.
//!
//! ```text
//! instr := act | act ", then " act | act " after you " act
//! act   := "go to " D | "pick up " D | "open " D_door | "put " D " next to " D
//! D     := ("the" | "a") [colour] (key | ball | box | door | object)
//! ```
//!
//! Success (BabyAI's rules): go to — a matching object is in the cell in front (checked after every
//! action); pick up — a matching object was just picked up; open — a matching door was just opened
//! by a toggle; put next to — a matching object was just dropped on a cell orthogonally adjacent to
//! a matching target. Sequences complete in order; "A after you B" means B first, then A.
//!
//! "the" and "a" verify the same way: BabyAI writes "the" when one object matches and "a" when
//! several do, and any matching object counts.

use std::fmt;

use super::world::{ActionEffect, Cell, Color, Object, ObjectKind, World};

/// What a descriptor can name (`None` in [`ObjDesc::kind`] is "object": anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjType {
    Key,
    Ball,
    Box,
    Door,
}

impl ObjType {
    pub const ALL: [ObjType; 4] = [ObjType::Key, ObjType::Ball, ObjType::Box, ObjType::Door];

    pub fn name(self) -> &'static str {
        match self {
            ObjType::Key => "key",
            ObjType::Ball => "ball",
            ObjType::Box => "box",
            ObjType::Door => "door",
        }
    }

    pub fn from_name(name: &str) -> Option<ObjType> {
        ObjType::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl From<ObjectKind> for ObjType {
    fn from(kind: ObjectKind) -> ObjType {
        match kind {
            ObjectKind::Key => ObjType::Key,
            ObjectKind::Ball => ObjType::Ball,
            ObjectKind::Box => ObjType::Box,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Article {
    The,
    A,
}

/// An object descriptor: "the red ball", "a door", "the object".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjDesc {
    pub article: Article,
    pub color: Option<Color>,
    /// `None` is the word "object" and matches keys, balls, boxes and doors.
    pub kind: Option<ObjType>,
}

impl ObjDesc {
    pub fn new(article: Article, color: Option<Color>, kind: Option<ObjType>) -> ObjDesc {
        ObjDesc { article, color, kind }
    }

    /// "the {colour} {kind}", the form task generation uses for a unique target.
    pub fn the(color: Color, kind: ObjType) -> ObjDesc {
        ObjDesc::new(Article::The, Some(color), Some(kind))
    }

    pub fn matches(&self, kind: ObjType, color: Color) -> bool {
        self.kind.is_none_or(|k| k == kind) && self.color.is_none_or(|c| c == color)
    }

    pub fn matches_object(&self, object: &Object) -> bool {
        self.matches(object.kind.into(), object.color)
    }

    /// Whether a cell holds a matching key, ball, box or door.
    pub fn matches_cell(&self, cell: &Cell) -> bool {
        match cell {
            Cell::Object(object) => self.matches_object(object),
            Cell::Door { color, .. } => self.matches(ObjType::Door, *color),
            _ => false,
        }
    }

    /// How many things in the world (grid cells and the carried object) match.
    pub fn count_matches(&self, world: &World) -> usize {
        let on_grid = world.positions().filter(|&p| self.matches_cell(world.cell(p))).count();
        on_grid + usize::from(world.carrying().is_some_and(|o| self.matches_object(o)))
    }
}

impl fmt::Display for ObjDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let article = match self.article {
            Article::The => "the",
            Article::A => "a",
        };
        f.write_str(article)?;
        if let Some(color) = self.color {
            write!(f, " {}", color.name())?;
        }
        write!(f, " {}", self.kind.map_or("object", ObjType::name))
    }
}

/// One action clause of a mission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Act {
    GoTo(ObjDesc),
    PickUp(ObjDesc),
    /// The descriptor names a door.
    Open(ObjDesc),
    /// Put the first next to the second.
    PutNext(ObjDesc, ObjDesc),
}

impl fmt::Display for Act {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Act::GoTo(d) => write!(f, "go to {d}"),
            Act::PickUp(d) => write!(f, "pick up {d}"),
            Act::Open(d) => write!(f, "open {d}"),
            Act::PutNext(a, b) => write!(f, "put {a} next to {b}"),
        }
    }
}

/// A whole mission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Instr {
    Single(Act),
    /// "A, then B": A first.
    Then(Act, Act),
    /// "A after you B": B first, then A (the text order is kept in the fields).
    After(Act, Act),
}

impl Instr {
    /// The acts in the order they must be completed.
    pub fn acts_in_order(&self) -> Vec<Act> {
        match *self {
            Instr::Single(a) => vec![a],
            Instr::Then(a, b) => vec![a, b],
            Instr::After(a, b) => vec![b, a],
        }
    }

    /// The mission text, e.g. "go to the red ball after you pick up the blue key".
    pub fn text(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Instr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Instr::Single(a) => write!(f, "{a}"),
            Instr::Then(a, b) => write!(f, "{a}, then {b}"),
            Instr::After(a, b) => write!(f, "{a} after you {b}"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MissionError {
    #[error("cannot read mission `{text}`: {why}")]
    Parse { text: String, why: String },
}

/// Reads a mission written in the grammar above (the inverse of [`Instr::text`]).
pub fn parse_instr(text: &str) -> Result<Instr, MissionError> {
    let fail = |why: &str| MissionError::Parse { text: text.to_string(), why: why.to_string() };
    let text_trimmed = text.trim();
    if let Some((a, b)) = text_trimmed.split_once(", then ") {
        return Ok(Instr::Then(parse_act(a).map_err(|w| fail(&w))?, parse_act(b).map_err(|w| fail(&w))?));
    }
    if let Some((a, b)) = text_trimmed.split_once(" after you ") {
        return Ok(Instr::After(parse_act(a).map_err(|w| fail(&w))?, parse_act(b).map_err(|w| fail(&w))?));
    }
    parse_act(text_trimmed).map(Instr::Single).map_err(|w| fail(&w))
}

fn parse_act(text: &str) -> Result<Act, String> {
    if let Some(rest) = text.strip_prefix("go to ") {
        return Ok(Act::GoTo(parse_desc(rest)?));
    }
    if let Some(rest) = text.strip_prefix("pick up ") {
        return Ok(Act::PickUp(parse_desc(rest)?));
    }
    if let Some(rest) = text.strip_prefix("open ") {
        let desc = parse_desc(rest)?;
        if desc.kind != Some(ObjType::Door) {
            return Err(format!("`open` needs a door, not `{rest}`"));
        }
        return Ok(Act::Open(desc));
    }
    if let Some(rest) = text.strip_prefix("put ") {
        let (a, b) = rest.split_once(" next to ").ok_or_else(|| format!("`put {rest}` lacks ` next to `"))?;
        return Ok(Act::PutNext(parse_desc(a)?, parse_desc(b)?));
    }
    Err(format!("`{text}` does not start with go to, pick up, open or put"))
}

fn parse_desc(text: &str) -> Result<ObjDesc, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let (article, rest) = match words.split_first() {
        Some((&"the", rest)) => (Article::The, rest),
        Some((&"a", rest)) => (Article::A, rest),
        _ => return Err(format!("`{text}` does not start with `the` or `a`")),
    };
    let (color, noun) = match rest {
        [noun] => (None, *noun),
        [color, noun] => (Some(Color::from_name(color).ok_or_else(|| format!("unknown colour `{color}`"))?), *noun),
        _ => return Err(format!("`{text}` is not ARTICLE [COLOUR] NOUN")),
    };
    let kind = match noun {
        "object" => None,
        other => Some(ObjType::from_name(other).ok_or_else(|| format!("unknown object `{other}`"))?),
    };
    Ok(ObjDesc { article, color, kind })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    InProgress,
    Success,
    /// The mission can no longer be completed: something it names is gone (an empty box that
    /// was toggled away). BabyAI would run on to the step limit; ending now saves the steps.
    Failure,
}

/// Tracks a mission's progress through the acts, step by step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    acts: Vec<Act>,
    completed: usize,
    status: Status,
}

impl Verifier {
    pub fn new(instr: &Instr) -> Verifier {
        Verifier { acts: instr.acts_in_order(), completed: 0, status: Status::InProgress }
    }

    /// The acts in the order they must be completed.
    pub fn acts(&self) -> &[Act] {
        &self.acts
    }

    /// How many acts are done.
    pub fn completed(&self) -> usize {
        self.completed
    }

    /// The acts still to do, the current one first.
    pub fn remaining(&self) -> &[Act] {
        &self.acts[self.completed.min(self.acts.len())..]
    }

    pub fn current(&self) -> Option<&Act> {
        self.acts.get(self.completed)
    }

    pub fn status(&self) -> Status {
        self.status
    }

    /// Checks the world after one action whose result was `effect`.
    ///
    /// When an act completes, the next act is checked at once against the same state (so "pick up
    /// A, then go to B" succeeds on the pick-up if B is then in front, as in BabyAI). The event
    /// itself (a pick-up, drop or toggle) counts for one act only, so "pick up a ball, then pick up
    /// a ball" needs two pick-ups.
    pub fn update(&mut self, world: &World, effect: &ActionEffect) -> Status {
        if self.status != Status::InProgress {
            return self.status;
        }
        let mut event = Some(effect);
        while let Some(act) = self.acts.get(self.completed) {
            if !act_done(act, world, event) {
                break;
            }
            self.completed += 1;
            event = None;
        }
        self.status = if self.completed >= self.acts.len() {
            Status::Success
        } else if self.remaining().iter().any(|act| !still_possible(act, world)) {
            Status::Failure
        } else {
            Status::InProgress
        };
        self.status
    }
}

fn act_done(act: &Act, world: &World, event: Option<&ActionEffect>) -> bool {
    match (act, event) {
        (Act::GoTo(d), _) => d.matches_cell(world.front_cell()),
        (Act::PickUp(d), Some(ActionEffect::PickedUp { object, .. })) => d.matches_object(object),
        (Act::Open(d), Some(ActionEffect::Unlocked { color, .. } | ActionEffect::DoorOpened { color, .. })) => {
            d.matches(ObjType::Door, *color)
        }
        (Act::PutNext(what, next_to), Some(ActionEffect::Dropped { object, at })) => {
            what.matches_object(object) && at.neighbours().iter().any(|&n| next_to.matches_cell(world.cell(n)))
        }
        _ => false,
    }
}

/// Whether everything the act names still exists somewhere (on the grid or in hand).
fn still_possible(act: &Act, world: &World) -> bool {
    match act {
        Act::GoTo(d) | Act::PickUp(d) | Act::Open(d) => d.count_matches(world) > 0,
        Act::PutNext(a, b) => a.count_matches(world) > 0 && b.count_matches(world) > 0,
    }
}

/// The full descriptor of an object: "the {colour} {kind}".
pub fn desc_for(object: &Object) -> ObjDesc {
    ObjDesc::the(object.color, object.kind.into())
}
