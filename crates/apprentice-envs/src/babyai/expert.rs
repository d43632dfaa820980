//! The scripted expert ("bot") for BabyAI-Text, in the spirit of the BabyAI bot.
//!
//! - **Memory.** The expert keeps a map of the cells it has seen, updated from the agent's visible
//!   cells ([`World::visible_cells`]) on every [`Expert::observe`]. It plans on that map only; the
//!   other things it reads from the world are the agent's own position, direction and what it
//!   carries (and, through the [`Verifier`], which act of the mission is current). There is no
//!   full-grid shortcut: because every change to the world happens in the cell in front of the
//!   agent (always visible), a seen cell never goes stale while it is out of sight.
//! - **Subgoals.** Each decision runs a stack of [`Subgoal`]s: the current act of the mission at
//!   the bottom, then what it needs (go next to a cell, drop, open a door, fetch its key, move a
//!   blocking object away, explore). The top subgoal either yields an action, reports itself done
//!   (popped) or pushes what it needs first; [`Expert::subgoals`] shows the last stack.
//! - **Re-planning.** The stack is rebuilt from the state actually reached at every step, so when
//!   the action taken was not the expert's own (noise), the next decision simply starts from where
//!   the agent is. Only three notes persist besides the map, each re-checked every step: the
//!   blocker being moved away (until it is picked up), the cells blockers were cleared from (not to
//!   be dropped back on), and the spot chosen for a drop (so the choice does not flip as the agent
//!   turns).
//! - **Planning.** Shortest paths are Dijkstra searches over (cell, direction) states on known
//!   cells (unknown cells are impassable): turning and stepping cost 1, a closed door (or a locked
//!   one whose key is in hand) costs a toggle more. When no path exists, a second pass lets the
//!   path run through a known object at a price; the object is then picked up and dropped out of
//!   the way. When the target is not known yet, the expert goes to the nearest pose from which an
//!   unseen cell would come into view (the world's own sight rules, unseen cells taken as
//!   transparent, so every such move reveals at least one cell), and when nothing more can be seen
//!   from where it can go, it opens a closed or locked door with unseen cells behind it.
//! - **Hands.** A locked door needs the key of its colour: the expert fetches it. Whatever it holds
//!   is put down only once the thing to pick up next is known (it may be the key to a door on the
//!   way), on a floor cell chosen so the drop lengthens the way on as little as possible.
//! - **Missions.** "go to": face a matching object (if the only match is in hand, put it down in
//!   front); "pick up": face and pick up a match (a match already in hand is put down and picked up
//!   again, since the act needs the pick-up); "open": toggle a matching door, fetching its key if
//!   locked (an open one is closed first); "put A next to B": pick up an A, face a free floor cell
//!   beside a B, drop; sequences follow the verifier's current act.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::mission::{Act, ObjDesc, ObjType, Status, Verifier};
use super::world::{propagate_sight, Action, Cell, Color, Dir, DoorState, Object, ObjectKind, Pos, World, VIEW_HALF};

/// Extra price of walking through a known object (pick it up, drop it aside, come back).
const CLEAR_COST: u32 = 6;
/// Extra price of dropping something next to a door (it may block the doorway).
const DOORWAY_PENALTY: u32 = 4;
/// Extra price of dropping something where a blocker was cleared from.
const CLEARED_PENALTY: u32 = 3;
/// Price of a drop that cuts the way to what comes next (or the most a drop may lengthen it).
const BLOCKED_PENALTY: u32 = 50;
/// Stands for a dropped object in a search that asks what a drop would block.
static BLOCKED: Cell = Cell::Object(Object { kind: ObjectKind::Ball, color: Color::Red, contents: None });
/// Most subgoal evaluations in one decision; a safety net against a plan that loops.
const MAX_EVALUATIONS: usize = 64;

/// One entry of the expert's subgoal stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subgoal {
    /// Complete this act of the mission (the bottom of the stack).
    Act(Act),
    /// Stand next to one of `targets`, facing it. `allow_clearing`: the path may run through a
    /// known object, which is then moved out of the way.
    GoNextTo { targets: Vec<Pos>, allow_clearing: bool },
    /// Put the carried object down on a floor cell where it does not lengthen the way to what
    /// the plan must face next: one cell of each group in `keep_clear`.
    DropAway { keep_clear: Vec<Vec<Pos>> },
    /// Have the key of this colour in hand.
    FetchKey { color: Color },
    /// Open the door at this position (to see or go beyond it).
    OpenDoor { pos: Pos },
    /// Move the object at `pos` out of the way to `beyond`.
    Clear { pos: Pos, beyond: Vec<Pos> },
    /// Go where an unseen cell comes into view.
    Explore,
}

/// What evaluating the top subgoal gave.
enum Outcome {
    Action(Action),
    Done,
    Push(Subgoal),
    /// The subgoal cannot make progress.
    Stuck,
}

/// One edge of the search graph over (cell, direction) states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    Start,
    Left,
    Right,
    Forward,
    /// Forward through the closed (or locked, key in hand) door in front: toggle first.
    Door,
    /// Forward through the object in front: move it away first.
    Clear,
}

/// A finished Dijkstra search from the agent's state.
struct Search {
    width: i32,
    height: i32,
    dist: Vec<u32>,
    prev: Vec<(u32, Edge)>,
}

impl Search {
    fn index(&self, pos: Pos, dir: Dir) -> usize {
        ((pos.y * self.width + pos.x) * 4) as usize + dir.index()
    }

    fn state(&self, index: usize) -> (Pos, Dir) {
        let cell = (index / 4) as i32;
        (Pos::new(cell % self.width, cell / self.width), Dir::ALL[index % 4])
    }

    fn cost(&self, index: usize) -> u32 {
        self.dist[index]
    }

    /// The cheapest state facing one of `targets`: (state index, cost).
    fn best_facing(&self, targets: &[Pos]) -> Option<(usize, u32)> {
        let mut best: Option<(usize, u32)> = None;
        for &target in targets {
            for dir in Dir::ALL {
                // Standing at `target - dir`, facing `dir`.
                let (dx, dy) = dir.vec();
                let pos = Pos::new(target.x - dx, target.y - dy);
                if !(0..self.width).contains(&pos.x) || !(0..self.height).contains(&pos.y) {
                    continue;
                }
                let index = self.index(pos, dir);
                let cost = self.dist[index];
                if cost != u32::MAX && best.is_none_or(|(i, c)| (cost, index) < (c, i)) {
                    best = Some((index, cost));
                }
            }
        }
        best
    }

    /// The first edge on the path to `goal` (`Edge::Start` when the agent is already there).
    fn first_edge(&self, goal: usize) -> Edge {
        let mut at = goal;
        let mut edge = Edge::Start;
        while self.prev[at].1 != Edge::Start {
            edge = self.prev[at].1;
            at = self.prev[at].0 as usize;
        }
        edge
    }
}

/// The scripted expert. Create one per episode with [`Expert::new`], call [`Expert::observe`]
/// after every step (whoever chose the action) and [`Expert::act`] for its next action.
#[derive(Debug, Clone)]
pub struct Expert {
    width: i32,
    height: i32,
    /// The last seen content of each cell, row-major; `None` = never seen.
    known: Vec<Option<Cell>>,
    /// An object being moved out of the way (its cell) and the targets it blocks.
    clearing: Option<(Pos, Vec<Pos>)>,
    /// Cells blockers were cleared from: nothing is dropped back onto them.
    cleared: Vec<Pos>,
    /// Where the carried object is being taken to be dropped (kept while it stays valid, so the
    /// choice does not flip as the agent turns).
    drop_spot: Option<Pos>,
    /// The stack of the last decision, bottom first.
    stack: Vec<Subgoal>,
}

impl Expert {
    /// A fresh expert for an episode starting in `world`; it sees what the agent sees now.
    pub fn new(world: &World) -> Expert {
        let mut expert = Expert {
            width: world.width(),
            height: world.height(),
            known: vec![None; (world.width() * world.height()) as usize],
            clearing: None,
            cleared: Vec::new(),
            drop_spot: None,
            stack: Vec::new(),
        };
        expert.observe(world);
        expert
    }

    /// Records what the agent sees now. Call after every step, whoever chose the action.
    pub fn observe(&mut self, world: &World) {
        if world.width() != self.width || world.height() != self.height {
            *self = Expert::new(world);
            return;
        }
        for pos in world.visible_cells() {
            let index = self.cell_index(pos);
            self.known[index] = Some(world.cell(pos).clone());
        }
    }

    /// What the expert remembers of the cell at `pos` (`None`: never seen). Outside the grid
    /// reads as a wall.
    pub fn known(&self, pos: Pos) -> Option<&Cell> {
        if self.in_bounds(pos) {
            self.known[self.cell_index(pos)].as_ref()
        } else {
            Some(&Cell::Wall)
        }
    }

    /// The subgoal stack of the last decision, bottom (the current act) first.
    pub fn subgoals(&self) -> &[Subgoal] {
        &self.stack
    }

    /// The next action for the mission `verifier` tracks (`Done` once it is over).
    pub fn act(&mut self, world: &World, verifier: &Verifier) -> Action {
        if verifier.status() != Status::InProgress {
            return Action::Done;
        }
        match verifier.current() {
            Some(act) => self.act_for(world, act),
            None => Action::Done,
        }
    }

    /// The next action towards completing `act`.
    pub fn act_for(&mut self, world: &World, act: &Act) -> Action {
        self.observe(world);
        let mut stack = vec![Subgoal::Act(*act)];
        // A blocker being moved away stays the first thing to do until it has been picked up.
        if let Some((pos, beyond)) = self.clearing.clone() {
            if matches!(self.known(pos), Some(Cell::Object(_))) {
                stack.push(Subgoal::Clear { pos, beyond });
            } else {
                self.clearing = None;
                self.cleared.push(pos);
            }
        }
        if world.carrying().is_none() {
            self.drop_spot = None;
        }
        let mut action = None;
        for _ in 0..MAX_EVALUATIONS {
            let Some(top) = stack.last().cloned() else { break };
            match self.evaluate(world, &top) {
                Outcome::Action(a) => {
                    action = Some(a);
                    break;
                }
                Outcome::Done => {
                    stack.pop();
                }
                Outcome::Push(subgoal) => {
                    if let Subgoal::Clear { pos, beyond } = &subgoal {
                        self.clearing = Some((*pos, beyond.clone()));
                    }
                    stack.push(subgoal);
                }
                Outcome::Stuck => {
                    // Give up on a blocker that cannot be reached; otherwise nothing to be done.
                    if matches!(top, Subgoal::Clear { .. }) {
                        self.clearing = None;
                    }
                    break;
                }
            }
        }
        self.stack = stack;
        // Nothing to do (a target that cannot be found or reached): look around.
        action.unwrap_or(Action::TurnLeft)
    }

    /// The text of the next action, as an agent would answer it.
    pub fn action_text(&mut self, world: &World, verifier: &Verifier) -> String {
        self.act(world, verifier).name().to_string()
    }

    fn evaluate(&mut self, world: &World, subgoal: &Subgoal) -> Outcome {
        match subgoal {
            Subgoal::Act(act) => self.eval_act(world, act),
            Subgoal::GoNextTo { targets, allow_clearing } => self.eval_go_next_to(world, targets, *allow_clearing),
            Subgoal::DropAway { keep_clear } => self.eval_drop_away(world, keep_clear),
            Subgoal::FetchKey { color } => self.eval_fetch_key(world, *color),
            Subgoal::OpenDoor { pos } => self.eval_open_door(world, *pos),
            Subgoal::Clear { pos, beyond } => self.eval_clear(world, *pos, beyond),
            Subgoal::Explore => self.eval_explore(world),
        }
    }

    // ----- acts -------------------------------------------------------------------------------

    fn eval_act(&self, world: &World, act: &Act) -> Outcome {
        match act {
            Act::GoTo(desc) => self.eval_goto(world, desc),
            Act::PickUp(desc) => self.eval_pickup(world, desc),
            Act::Open(desc) => self.eval_open(world, desc),
            Act::PutNext(what, next_to) => self.eval_put_next(world, what, next_to),
        }
    }

    fn eval_goto(&self, world: &World, desc: &ObjDesc) -> Outcome {
        let front = world.front_pos();
        if self.known(front).is_some_and(|c| desc.matches_cell(c)) {
            // Already facing it (only possible before the first action): any action that keeps
            // it in front completes the act. Dropping onto a non-floor cell changes nothing.
            return Outcome::Action(Action::Drop);
        }
        if world.carrying().is_some_and(|o| desc.matches_object(o)) {
            // The target is in hand (noise picked it up): put it down in front of us.
            return Outcome::Push(Subgoal::DropAway { keep_clear: Vec::new() });
        }
        let targets = self.find(|c| desc.matches_cell(c));
        if targets.is_empty() {
            return Outcome::Push(Subgoal::Explore);
        }
        Outcome::Push(Subgoal::GoNextTo { targets, allow_clearing: true })
    }

    fn eval_pickup(&self, world: &World, desc: &ObjDesc) -> Outcome {
        let targets = self.find(|c| matches!(c, Cell::Object(o) if desc.matches_object(o)));
        match world.carrying() {
            // A matching object in hand must be put down and picked up again.
            Some(carried) if desc.matches_object(carried) => {
                Outcome::Push(Subgoal::DropAway { keep_clear: Vec::new() })
            }
            // Hands must be empty, but keep what we hold while still looking (it may be the key
            // to a door on the way).
            Some(_) if targets.is_empty() => Outcome::Push(Subgoal::Explore),
            Some(_) => Outcome::Push(Subgoal::DropAway { keep_clear: vec![targets] }),
            None => self.pick_up_one_of(world, targets),
        }
    }

    /// With empty hands: pick up one of the objects at `targets` (explore when there are none).
    fn pick_up_one_of(&self, world: &World, targets: Vec<Pos>) -> Outcome {
        if targets.is_empty() {
            return Outcome::Push(Subgoal::Explore);
        }
        if targets.contains(&world.front_pos()) {
            return Outcome::Action(Action::PickUp);
        }
        Outcome::Push(Subgoal::GoNextTo { targets, allow_clearing: true })
    }

    fn eval_open(&self, world: &World, desc: &ObjDesc) -> Outcome {
        let doors = self.find(|c| matches!(c, Cell::Door { color, .. } if desc.matches(ObjType::Door, *color)));
        if doors.is_empty() {
            return Outcome::Push(Subgoal::Explore);
        }
        let front = world.front_pos();
        let door = if doors.contains(&front) {
            front
        } else {
            // The nearest door we can get next to.
            let search = self.search(world, true);
            match doors.iter().filter_map(|&d| search.best_facing(&[d]).map(|(_, cost)| (cost, d))).min() {
                Some((_, d)) => d,
                None => doors[0],
            }
        };
        let Some(Cell::Door { color, state }) = self.known(door).cloned() else {
            return Outcome::Stuck;
        };
        let has_key = carries_key(world, color);
        if state == DoorState::Locked && !has_key {
            return Outcome::Push(Subgoal::FetchKey { color });
        }
        if front == door {
            // Open: close it first, so the next toggle opens it (the act needs an opening toggle).
            return Outcome::Action(Action::Toggle);
        }
        Outcome::Push(Subgoal::GoNextTo { targets: vec![door], allow_clearing: true })
    }

    fn eval_put_next(&self, world: &World, what: &ObjDesc, next_to: &ObjDesc) -> Outcome {
        match world.carrying() {
            Some(carried) if what.matches_object(carried) => {
                // Drop it on a floor cell beside a matching target.
                let anchors = self.find(|c| next_to.matches_cell(c));
                if anchors.is_empty() {
                    return Outcome::Push(Subgoal::Explore);
                }
                let spots = self.drop_spots_next_to(&anchors);
                if spots.contains(&world.front_pos()) {
                    return Outcome::Action(Action::Drop);
                }
                if spots.is_empty() {
                    // Every side of every target is taken or unseen; look further.
                    return Outcome::Push(Subgoal::Explore);
                }
                Outcome::Push(Subgoal::GoNextTo { targets: spots, allow_clearing: true })
            }
            Some(_) => {
                // Keep the way to the object to move and to the target's free sides clear.
                let sources = self.put_next_sources(what, next_to);
                if sources.is_empty() {
                    return Outcome::Push(Subgoal::Explore);
                }
                let spots = self.drop_spots_next_to(&self.find(|c| next_to.matches_cell(c)));
                Outcome::Push(Subgoal::DropAway { keep_clear: vec![sources, spots] })
            }
            None => {
                let sources = self.put_next_sources(what, next_to);
                self.pick_up_one_of(world, sources)
            }
        }
    }

    /// Known objects matching `what` that can be moved next to something else matching `next_to`.
    fn put_next_sources(&self, what: &ObjDesc, next_to: &ObjDesc) -> Vec<Pos> {
        let sources = self.find(|c| matches!(c, Cell::Object(o) if what.matches_object(o)));
        let anchors = self.find(|c| next_to.matches_cell(c));
        let usable: Vec<Pos> =
            sources.iter().copied().filter(|s| anchors.is_empty() || anchors.iter().any(|a| a != s)).collect();
        if usable.is_empty() {
            sources
        } else {
            usable
        }
    }

    /// Known floor cells orthogonally next to one of `anchors`.
    fn drop_spots_next_to(&self, anchors: &[Pos]) -> Vec<Pos> {
        let mut spots: Vec<Pos> = anchors
            .iter()
            .flat_map(|a| a.neighbours())
            .filter(|&n| matches!(self.known(n), Some(Cell::Floor)))
            .collect();
        spots.sort();
        spots.dedup();
        spots
    }

    // ----- subgoals ---------------------------------------------------------------------------

    fn eval_go_next_to(&self, world: &World, targets: &[Pos], allow_clearing: bool) -> Outcome {
        if targets.contains(&world.front_pos()) {
            return Outcome::Done;
        }
        let mut found = None;
        for clearing in [false, true] {
            if clearing && !allow_clearing {
                break;
            }
            let search = self.search(world, clearing);
            if let Some((goal, _)) = search.best_facing(targets) {
                found = Some(search.first_edge(goal));
                break;
            }
        }
        match found {
            Some(Edge::Start) => Outcome::Done,
            Some(Edge::Left) => Outcome::Action(Action::TurnLeft),
            Some(Edge::Right) => Outcome::Action(Action::TurnRight),
            Some(Edge::Forward) => Outcome::Action(Action::Forward),
            Some(Edge::Door) => Outcome::Action(Action::Toggle),
            Some(Edge::Clear) => Outcome::Push(Subgoal::Clear { pos: world.front_pos(), beyond: targets.to_vec() }),
            // Unreachable on what is known: look for another way.
            None => Outcome::Push(Subgoal::Explore),
        }
    }

    fn eval_drop_away(&mut self, world: &World, keep_clear: &[Vec<Pos>]) -> Outcome {
        if world.carrying().is_none() {
            return Outcome::Done;
        }
        let search = self.search(world, false);
        // Keep going to the spot chosen before while it is still free floor and reachable.
        if let Some(spot) = self.drop_spot.filter(|&s| matches!(self.known(s), Some(Cell::Floor))) {
            if world.front_pos() == spot {
                return Outcome::Action(Action::Drop);
            }
            if let Some((goal, _)) = search.best_facing(&[spot]) {
                return edge_action(search.first_edge(goal));
            }
        }
        self.drop_spot = None;
        // Every reachable pose facing known floor, cheapest first (walking there, plus a little
        // for spots beside a door or where a blocker was cleared from).
        let mut candidates: Vec<(u32, usize, Pos)> = Vec::new();
        for index in 0..search.dist.len() {
            let cost = search.cost(index);
            if cost == u32::MAX {
                continue;
            }
            let (pos, dir) = search.state(index);
            let spot = pos.step(dir, 1);
            if !matches!(self.known(spot), Some(Cell::Floor)) {
                continue;
            }
            let near_door = spot.neighbours().iter().any(|&n| matches!(self.known(n), Some(Cell::Door { .. })));
            let mut score = cost;
            if near_door {
                score += DOORWAY_PENALTY;
            }
            if self.cleared.contains(&spot) {
                score += CLEARED_PENALTY;
            }
            candidates.push((score, index, spot));
        }
        candidates.sort();
        // Add what occupying the spot would cost the way on (branch and bound: a candidate whose
        // base score already loses cannot win).
        let mut best: Option<(u32, usize, Pos)> = None;
        for (score, index, spot) in candidates {
            if best.is_some_and(|(b, _, _)| score >= b) {
                break;
            }
            let (pos, dir) = search.state(index);
            let total = score + self.blocking_penalty(world, pos, dir, spot, keep_clear);
            if best.is_none_or(|(b, _, _)| total < b) {
                best = Some((total, index, spot));
            }
        }
        let Some((_, goal, spot)) = best else {
            return Outcome::Push(Subgoal::Explore);
        };
        self.drop_spot = Some(spot);
        match search.first_edge(goal) {
            Edge::Start => Outcome::Action(Action::Drop),
            edge => edge_action(edge),
        }
    }

    /// How much longer the way from `pos` facing `dir` to one cell of each group of `keep_clear`
    /// becomes when an object is dropped on `spot` ([`BLOCKED_PENALTY`] when it cuts the way).
    fn blocking_penalty(&self, world: &World, pos: Pos, dir: Dir, spot: Pos, keep_clear: &[Vec<Pos>]) -> u32 {
        if keep_clear.iter().all(Vec::is_empty) {
            return 0;
        }
        let open = self.search_from(world, pos, dir, false, None);
        let blocked = self.search_from(world, pos, dir, false, Some(spot));
        let mut penalty = 0;
        for group in keep_clear {
            let Some((_, before)) = open.best_facing(group) else { continue };
            let rest: Vec<Pos> = group.iter().copied().filter(|&t| t != spot).collect();
            penalty += match blocked.best_facing(&rest) {
                Some((_, after)) => after.saturating_sub(before).min(BLOCKED_PENALTY),
                None => BLOCKED_PENALTY,
            };
        }
        penalty
    }

    fn eval_fetch_key(&self, world: &World, color: Color) -> Outcome {
        if carries_key(world, color) {
            return Outcome::Done;
        }
        let keys =
            self.find(|c| matches!(c, Cell::Object(Object { kind: ObjectKind::Key, color: k, .. }) if *k == color));
        if world.carrying().is_some() && !keys.is_empty() {
            return Outcome::Push(Subgoal::DropAway { keep_clear: vec![keys] });
        }
        self.pick_up_one_of(world, keys)
    }

    fn eval_open_door(&self, world: &World, pos: Pos) -> Outcome {
        let Some(Cell::Door { color, state }) = self.known(pos).cloned() else {
            return Outcome::Done;
        };
        match state {
            DoorState::Open => Outcome::Done,
            DoorState::Locked if !carries_key(world, color) => Outcome::Push(Subgoal::FetchKey { color }),
            _ if world.front_pos() == pos => Outcome::Action(Action::Toggle),
            _ => Outcome::Push(Subgoal::GoNextTo { targets: vec![pos], allow_clearing: true }),
        }
    }

    fn eval_clear(&self, world: &World, pos: Pos, beyond: &[Pos]) -> Outcome {
        if !matches!(self.known(pos), Some(Cell::Object(_))) {
            return Outcome::Done;
        }
        if world.carrying().is_some() {
            return Outcome::Push(Subgoal::DropAway { keep_clear: vec![vec![pos], beyond.to_vec()] });
        }
        if world.front_pos() == pos {
            return Outcome::Action(Action::PickUp);
        }
        let search = self.search(world, false);
        match search.best_facing(&[pos]) {
            Some((goal, _)) => edge_action(search.first_edge(goal)),
            None => Outcome::Stuck,
        }
    }

    fn eval_explore(&self, world: &World) -> Outcome {
        let search = self.search(world, false);
        // States by cost; the first (cheapest, then most revealing) one that shows unseen cells.
        let mut order: Vec<usize> = (0..search.dist.len()).filter(|&i| search.cost(i) != u32::MAX).collect();
        order.sort_by_key(|&i| (search.cost(i), i));
        let mut best: Option<(u32, usize, usize)> = None; // (cost, revealed, index)
        for &index in &order {
            let cost = search.cost(index);
            if best.is_some_and(|(c, _, _)| cost > c) {
                break;
            }
            let (pos, dir) = search.state(index);
            let revealed = self.unseen_in_view(pos, dir);
            if revealed > 0 && best.is_none_or(|(_, r, _)| revealed > r) {
                best = Some((cost, revealed, index));
            }
        }
        if let Some((_, _, goal)) = best {
            return edge_action(search.first_edge(goal));
        }
        // Nothing more to see from where we can go: open the nearest closed door with unseen
        // cells behind it.
        let doors = self.find(|c| matches!(c, Cell::Door { state: DoorState::Closed | DoorState::Locked, .. }));
        let frontier_doors: Vec<Pos> =
            doors.into_iter().filter(|d| d.neighbours().iter().any(|&n| self.known(n).is_none())).collect();
        let search = self.search(world, true);
        let nearest = frontier_doors
            .iter()
            .filter_map(|&d| search.best_facing(&[d]).map(|(_, cost)| (cost, d)))
            .min()
            .map(|(_, d)| d);
        match nearest {
            Some(door) => Outcome::Push(Subgoal::OpenDoor { pos: door }),
            None => Outcome::Stuck,
        }
    }

    // ----- the map and searches ---------------------------------------------------------------

    fn in_bounds(&self, pos: Pos) -> bool {
        (0..self.width).contains(&pos.x) && (0..self.height).contains(&pos.y)
    }

    fn cell_index(&self, pos: Pos) -> usize {
        (pos.y * self.width + pos.x) as usize
    }

    /// Known positions whose cell satisfies `pred`, row by row.
    fn find(&self, pred: impl Fn(&Cell) -> bool) -> Vec<Pos> {
        let mut out = Vec::new();
        for y in 0..self.height {
            for x in 0..self.width {
                let pos = Pos::new(x, y);
                if self.known(pos).is_some_and(&pred) {
                    out.push(pos);
                }
            }
        }
        out
    }

    /// Dijkstra over (cell, direction) from the agent's state on known cells.
    fn search(&self, world: &World, allow_clearing: bool) -> Search {
        self.search_from(world, world.agent_pos(), world.agent_dir(), allow_clearing, None)
    }

    /// Dijkstra over (cell, direction) from `pos` facing `dir`, on known cells, with `blocked`
    /// taken as holding an object.
    fn search_from(&self, world: &World, pos: Pos, dir: Dir, allow_clearing: bool, blocked: Option<Pos>) -> Search {
        let states = (self.width * self.height * 4) as usize;
        let mut search = Search {
            width: self.width,
            height: self.height,
            dist: vec![u32::MAX; states],
            prev: vec![(0, Edge::Start); states],
        };
        let start = search.index(pos, dir);
        search.dist[start] = 0;
        let mut heap = BinaryHeap::new();
        heap.push(Reverse((0u32, start)));
        while let Some(Reverse((cost, index))) = heap.pop() {
            if cost > search.dist[index] {
                continue;
            }
            let (pos, dir) = search.state(index);
            let mut relax = |search: &mut Search, next: usize, step: u32, edge: Edge| {
                let c = cost + step;
                if c < search.dist[next] {
                    search.dist[next] = c;
                    search.prev[next] = (index as u32, edge);
                    heap.push(Reverse((c, next)));
                }
            };
            let (left, right) = (search.index(pos, dir.left()), search.index(pos, dir.right()));
            relax(&mut search, left, 1, Edge::Left);
            relax(&mut search, right, 1, Edge::Right);
            let ahead = pos.step(dir, 1);
            if !self.in_bounds(ahead) {
                continue;
            }
            let cell = if blocked == Some(ahead) { Some(&BLOCKED) } else { self.known(ahead) };
            let step = match cell {
                Some(Cell::Floor | Cell::Goal | Cell::Door { state: DoorState::Open, .. }) => Some((1, Edge::Forward)),
                Some(Cell::Door { state: DoorState::Closed, .. }) => Some((2, Edge::Door)),
                Some(Cell::Door { state: DoorState::Locked, color }) if carries_key(world, *color) => {
                    Some((2, Edge::Door))
                }
                Some(Cell::Object(_)) if allow_clearing => Some((1 + CLEAR_COST, Edge::Clear)),
                _ => None,
            };
            if let Some((step, edge)) = step {
                let next = search.index(ahead, dir);
                relax(&mut search, next, step, edge);
            }
        }
        search
    }

    /// How many unseen cells would be visible from `pos` facing `dir`, by the world's sight
    /// rules with unseen cells taken as transparent.
    fn unseen_in_view(&self, pos: Pos, dir: Dir) -> usize {
        let cell_at = |f: usize, c: usize| pos.step(dir, f as i32).step(dir.right(), c as i32 - VIEW_HALF);
        let transparent = |f: usize, c: usize| self.known(cell_at(f, c)).is_none_or(Cell::is_transparent);
        let visible = propagate_sight(transparent);
        let mut count = 0;
        for (f, row) in visible.iter().enumerate() {
            for (c, &seen) in row.iter().enumerate() {
                if seen && self.known(cell_at(f, c)).is_none() {
                    count += 1;
                }
            }
        }
        count
    }
}

fn carries_key(world: &World, color: Color) -> bool {
    world.carrying().is_some_and(|o| o.kind == ObjectKind::Key && o.color == color)
}

/// The action that takes a path's first edge.
fn edge_action(edge: Edge) -> Outcome {
    match edge {
        Edge::Start => Outcome::Done,
        Edge::Left => Outcome::Action(Action::TurnLeft),
        Edge::Right => Outcome::Action(Action::TurnRight),
        Edge::Forward => Outcome::Action(Action::Forward),
        Edge::Door => Outcome::Action(Action::Toggle),
        // Paths searched without clearing never contain this edge.
        Edge::Clear => Outcome::Stuck,
    }
}
