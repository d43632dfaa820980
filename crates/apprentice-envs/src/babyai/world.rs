// WORLD-API-READY
//! The BabyAI grid world: cells, the agent, the seven actions and the agent's partial view.
//!
//! Coordinates: `x` grows east (right), `y` grows south (down), as in MiniGrid. Positions outside
//! the grid read as walls, so code that looks around the agent never has to bounds-check.
//!
//! The rules are those of MiniGrid/BabyAI (see `shared/reference/babyai.md`):
//! - `Forward` moves only onto floor, a goal or an open door;
//! - `PickUp` needs empty hands and a key, ball or box in front;
//! - `Drop` needs plain floor in front;
//! - `Toggle` opens a locked door only while carrying a key of its colour (the key stays in hand),
//!   flips an unlocked door between open and closed, and replaces a box by its contents;
//! - `Done` does nothing.
//!
//! The view is the 7×7 square ahead of the agent, the agent in the middle of its back row. Sight is
//! computed with MiniGrid's `process_vis` propagation (see [`World::view`]).

use std::fmt;

/// Side of the square view; the agent sits in the middle of its back row.
pub const VIEW_SIZE: i32 = 7;
/// How many cells the view reaches to each side of the agent.
pub const VIEW_HALF: i32 = VIEW_SIZE / 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Color {
    Red,
    Green,
    Blue,
    Purple,
    Yellow,
    Grey,
}

impl Color {
    pub const ALL: [Color; 6] = [Color::Red, Color::Green, Color::Blue, Color::Purple, Color::Yellow, Color::Grey];

    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Purple => "purple",
            Color::Yellow => "yellow",
            Color::Grey => "grey",
        }
    }

    pub fn from_name(name: &str) -> Option<Color> {
        Color::ALL.into_iter().find(|c| c.name() == name)
    }

    /// One lowercase letter for the ASCII map. Grey is `e` because `g` is green.
    pub fn letter(self) -> char {
        match self {
            Color::Red => 'r',
            Color::Green => 'g',
            Color::Blue => 'b',
            Color::Purple => 'p',
            Color::Yellow => 'y',
            Color::Grey => 'e',
        }
    }

    pub fn from_letter(letter: char) -> Option<Color> {
        Color::ALL.into_iter().find(|c| c.letter() == letter)
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The objects an agent can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Key,
    Ball,
    Box,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 3] = [ObjectKind::Key, ObjectKind::Ball, ObjectKind::Box];

    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Key => "key",
            ObjectKind::Ball => "ball",
            ObjectKind::Box => "box",
        }
    }
}

/// A key, ball or box. Only a box has contents; toggling it replaces the box by them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Object {
    pub kind: ObjectKind,
    pub color: Color,
    pub contents: Option<Box<Object>>,
}

impl Object {
    pub fn new(kind: ObjectKind, color: Color) -> Object {
        Object { kind, color, contents: None }
    }

    pub fn key(color: Color) -> Object {
        Object::new(ObjectKind::Key, color)
    }

    pub fn ball(color: Color) -> Object {
        Object::new(ObjectKind::Ball, color)
    }

    /// A box holding `contents` (or nothing).
    pub fn boxed(color: Color, contents: Option<Object>) -> Object {
        Object { kind: ObjectKind::Box, color, contents: contents.map(Box::new) }
    }

    /// "red ball"
    pub fn describe(&self) -> String {
        format!("{} {}", self.color.name(), self.kind.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DoorState {
    Open,
    Closed,
    Locked,
}

impl DoorState {
    pub fn name(self) -> &'static str {
        match self {
            DoorState::Open => "open",
            DoorState::Closed => "closed",
            DoorState::Locked => "locked",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Cell {
    Floor,
    Wall,
    /// MiniGrid's goal square: the agent may stand on it; no BabyAI mission refers to it.
    Goal,
    Door {
        color: Color,
        state: DoorState,
    },
    Object(Object),
}

impl Cell {
    /// The agent may stand here (and walk onto it with `Forward`).
    pub fn is_passable(&self) -> bool {
        matches!(self, Cell::Floor | Cell::Goal | Cell::Door { state: DoorState::Open, .. })
    }

    /// Sight passes through this cell (MiniGrid's `see_behind`): everything but walls and
    /// closed or locked doors.
    pub fn is_transparent(&self) -> bool {
        !matches!(self, Cell::Wall | Cell::Door { state: DoorState::Closed | DoorState::Locked, .. })
    }

    pub fn object(&self) -> Option<&Object> {
        match self {
            Cell::Object(object) => Some(object),
            _ => None,
        }
    }

    /// Two characters for the ASCII map (see [`World::from_ascii`]).
    fn ascii(&self) -> [char; 2] {
        match self {
            Cell::Floor => ['.', '.'],
            Cell::Wall => ['W', 'W'],
            Cell::Goal => ['G', 'G'],
            Cell::Door { color, state } => {
                let c = match state {
                    DoorState::Open => 'O',
                    DoorState::Closed => 'D',
                    DoorState::Locked => 'L',
                };
                [c, color.letter()]
            }
            Cell::Object(object) => {
                let c = match object.kind {
                    ObjectKind::Key => 'K',
                    ObjectKind::Ball => 'A',
                    ObjectKind::Box => 'B',
                };
                [c, object.color.letter()]
            }
        }
    }
}

/// Walls fill everything outside the grid, as in MiniGrid's view slices.
static OUTSIDE: Cell = Cell::Wall;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    pub x: i32,
    pub y: i32,
}

impl Pos {
    pub const fn new(x: i32, y: i32) -> Pos {
        Pos { x, y }
    }

    /// This position moved `steps` cells in direction `dir`.
    pub fn step(self, dir: Dir, steps: i32) -> Pos {
        let (dx, dy) = dir.vec();
        Pos { x: self.x + dx * steps, y: self.y + dy * steps }
    }

    /// The four orthogonal neighbours, in the order east, south, west, north.
    pub fn neighbours(self) -> [Pos; 4] {
        Dir::ALL.map(|d| self.step(d, 1))
    }

    /// True when `other` is one of the four orthogonal neighbours.
    pub fn is_next_to(self, other: Pos) -> bool {
        (self.x - other.x).abs() + (self.y - other.y).abs() == 1
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.x, self.y)
    }
}

/// Facing direction, in MiniGrid's order (0 = east, 1 = south, 2 = west, 3 = north).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    East,
    South,
    West,
    North,
}

impl Dir {
    pub const ALL: [Dir; 4] = [Dir::East, Dir::South, Dir::West, Dir::North];

    /// The unit step `(dx, dy)`.
    pub fn vec(self) -> (i32, i32) {
        match self {
            Dir::East => (1, 0),
            Dir::South => (0, 1),
            Dir::West => (-1, 0),
            Dir::North => (0, -1),
        }
    }

    /// Turning right is clockwise: east → south → west → north.
    pub fn right(self) -> Dir {
        Dir::ALL[(self.index() + 1) % 4]
    }

    pub fn left(self) -> Dir {
        Dir::ALL[(self.index() + 3) % 4]
    }

    pub fn index(self) -> usize {
        match self {
            Dir::East => 0,
            Dir::South => 1,
            Dir::West => 2,
            Dir::North => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dir::East => "east",
            Dir::South => "south",
            Dir::West => "west",
            Dir::North => "north",
        }
    }

    /// The agent's symbol on the ASCII map.
    pub fn arrow(self) -> char {
        match self {
            Dir::East => '>',
            Dir::South => 'v',
            Dir::West => '<',
            Dir::North => '^',
        }
    }

    pub fn from_arrow(c: char) -> Option<Dir> {
        Dir::ALL.into_iter().find(|d| d.arrow() == c)
    }
}

/// The agent's actions, in MiniGrid's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    TurnLeft,
    TurnRight,
    Forward,
    PickUp,
    Drop,
    Toggle,
    Done,
}

impl Action {
    pub const ALL: [Action; 7] = [
        Action::TurnLeft,
        Action::TurnRight,
        Action::Forward,
        Action::PickUp,
        Action::Drop,
        Action::Toggle,
        Action::Done,
    ];

    /// The six actions offered to an agent (`Done` is a no-op and is not offered).
    pub const OFFERED: [Action; 6] =
        [Action::TurnLeft, Action::TurnRight, Action::Forward, Action::PickUp, Action::Drop, Action::Toggle];

    /// The text an agent answers with, as in BALROG.
    pub fn name(self) -> &'static str {
        match self {
            Action::TurnLeft => "turn left",
            Action::TurnRight => "turn right",
            Action::Forward => "go forward",
            Action::PickUp => "pick up",
            Action::Drop => "drop",
            Action::Toggle => "toggle",
            Action::Done => "done",
        }
    }

    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one action did. Verifiers read the events (picked up, dropped, toggled) from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionEffect {
    Turned {
        dir: Dir,
    },
    Moved {
        to: Pos,
    },
    /// `Forward` into something the agent cannot walk onto; nothing changed.
    Blocked {
        at: Pos,
    },
    PickedUp {
        object: Object,
        from: Pos,
    },
    /// Hands full, or nothing that can be picked up in front.
    CannotPickUp {
        at: Pos,
    },
    Dropped {
        object: Object,
        at: Pos,
    },
    /// Nothing carried, or the cell in front is not plain floor.
    CannotDrop {
        at: Pos,
    },
    /// A locked door opened with the key of its colour.
    Unlocked {
        color: Color,
        at: Pos,
    },
    DoorOpened {
        color: Color,
        at: Pos,
    },
    DoorClosed {
        color: Color,
        at: Pos,
    },
    /// Toggled a locked door without its key.
    StillLocked {
        color: Color,
        at: Pos,
    },
    /// A box was toggled and replaced by its contents (`None`: it was empty and is gone).
    BoxOpened {
        color: Color,
        at: Pos,
        contents: Option<Object>,
    },
    /// Toggled something that does not react.
    NothingToToggle {
        at: Pos,
    },
    Done,
}

impl ActionEffect {
    /// Whether the world or the agent changed.
    pub fn changed_anything(&self) -> bool {
        !matches!(
            self,
            ActionEffect::Blocked { .. }
                | ActionEffect::CannotPickUp { .. }
                | ActionEffect::CannotDrop { .. }
                | ActionEffect::StillLocked { .. }
                | ActionEffect::NothingToToggle { .. }
                | ActionEffect::Done
        )
    }
}

/// One cell of the agent's view, addressed relative to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewCell {
    /// Cells ahead of the agent, 0 (its own row) to 6.
    pub forward: i32,
    /// Cells to the agent's right, -3 (left) to 3.
    pub right: i32,
    /// The world position; it may lie outside the grid, where [`World::cell`] reads a wall.
    pub pos: Pos,
    pub visible: bool,
}

/// The 7×7 view, with the visibility of every cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Row-major: `cells[forward][right + 3]`.
    cells: Vec<ViewCell>,
}

impl View {
    /// The cell `forward` ahead (0..=6) and `right` to the side (-3..=3), if inside the view.
    pub fn get(&self, forward: i32, right: i32) -> Option<&ViewCell> {
        if !(0..VIEW_SIZE).contains(&forward) || !(-VIEW_HALF..=VIEW_HALF).contains(&right) {
            return None;
        }
        self.cells.get((forward * VIEW_SIZE + right + VIEW_HALF) as usize)
    }

    /// All 49 cells, nearest row first, each row from left to right.
    pub fn cells(&self) -> &[ViewCell] {
        &self.cells
    }

    pub fn is_visible(&self, forward: i32, right: i32) -> bool {
        self.get(forward, right).is_some_and(|c| c.visible)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorldError {
    #[error("ascii map: {0}")]
    BadAscii(String),
    #[error("position {0} is outside the {1}x{2} grid")]
    OutOfBounds(Pos, i32, i32),
    #[error("the agent cannot stand at {0}: the cell is not floor, a goal or an open door")]
    AgentBlocked(Pos),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct World {
    width: i32,
    height: i32,
    /// Row-major, `y * width + x`.
    cells: Vec<Cell>,
    agent_pos: Pos,
    agent_dir: Dir,
    carrying: Option<Object>,
}

impl World {
    /// A `width`×`height` grid of floor surrounded by walls, the agent at (1, 1) facing east.
    /// Sizes below 3 are raised to 3 so the agent always has a cell to stand on.
    pub fn walled(width: i32, height: i32) -> World {
        let (width, height) = (width.max(3), height.max(3));
        let mut cells = vec![Cell::Floor; (width * height) as usize];
        for y in 0..height {
            for x in 0..width {
                if x == 0 || y == 0 || x == width - 1 || y == height - 1 {
                    cells[(y * width + x) as usize] = Cell::Wall;
                }
            }
        }
        World { width, height, cells, agent_pos: Pos::new(1, 1), agent_dir: Dir::East, carrying: None }
    }

    /// Builds a world from the map [`World::render_ascii`] prints: two characters per cell, rows
    /// separated by newlines (blank lines and surrounding whitespace ignored).
    ///
    /// `..` floor, `WW` wall, `GG` goal, `K`/`A`/`B` + colour key/ball/box, `O`/`D`/`L` + colour
    /// open/closed/locked door, and exactly one agent `>>`, `vv`, `<<` or `^^` (standing on floor).
    /// Colours: `r` red, `g` green, `b` blue, `p` purple, `y` yellow, `e` grey.
    pub fn from_ascii(map: &str) -> Result<World, WorldError> {
        let rows: Vec<Vec<char>> =
            map.lines().map(str::trim).filter(|l| !l.is_empty()).map(|l| l.chars().collect()).collect();
        let height = rows.len() as i32;
        let width = rows.first().map_or(0, |r| r.len() as i32 / 2);
        if height == 0 || width == 0 {
            return Err(WorldError::BadAscii("empty map".into()));
        }
        let mut cells = Vec::with_capacity((width * height) as usize);
        let mut agent = None;
        for (y, row) in rows.iter().enumerate() {
            if row.len() as i32 != width * 2 {
                return Err(WorldError::BadAscii(format!(
                    "row {y} has {} characters; expected {} (two per cell)",
                    row.len(),
                    width * 2
                )));
            }
            for (x, pair) in row.chunks_exact(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                let pos = Pos::new(x as i32, y as i32);
                if let Some(dir) = Dir::from_arrow(a).filter(|_| a == b) {
                    if agent.replace((pos, dir)).is_some() {
                        return Err(WorldError::BadAscii("more than one agent".into()));
                    }
                    cells.push(Cell::Floor);
                    continue;
                }
                let cell = match (a, b) {
                    ('.', '.') => Cell::Floor,
                    ('W', 'W') => Cell::Wall,
                    ('G', 'G') => Cell::Goal,
                    (kind, colour) => {
                        let color = Color::from_letter(colour)
                            .ok_or_else(|| WorldError::BadAscii(format!("unknown cell `{a}{b}` at {pos}")))?;
                        match kind {
                            'K' => Cell::Object(Object::key(color)),
                            'A' => Cell::Object(Object::ball(color)),
                            'B' => Cell::Object(Object::boxed(color, None)),
                            'O' => Cell::Door { color, state: DoorState::Open },
                            'D' => Cell::Door { color, state: DoorState::Closed },
                            'L' => Cell::Door { color, state: DoorState::Locked },
                            _ => return Err(WorldError::BadAscii(format!("unknown cell `{a}{b}` at {pos}"))),
                        }
                    }
                };
                cells.push(cell);
            }
        }
        let (agent_pos, agent_dir) = agent.ok_or_else(|| WorldError::BadAscii("no agent (>> vv << ^^)".into()))?;
        Ok(World { width, height, cells, agent_pos, agent_dir, carrying: None })
    }

    pub fn width(&self) -> i32 {
        self.width
    }

    pub fn height(&self) -> i32 {
        self.height
    }

    pub fn in_bounds(&self, pos: Pos) -> bool {
        (0..self.width).contains(&pos.x) && (0..self.height).contains(&pos.y)
    }

    /// The cell at `pos`; a wall outside the grid.
    pub fn cell(&self, pos: Pos) -> &Cell {
        if self.in_bounds(pos) {
            &self.cells[(pos.y * self.width + pos.x) as usize]
        } else {
            &OUTSIDE
        }
    }

    /// Replaces the cell at `pos`. Putting something impassable under the agent is allowed here
    /// (task generation places the agent last); [`World::place_agent`] checks.
    pub fn set(&mut self, pos: Pos, cell: Cell) -> Result<(), WorldError> {
        if !self.in_bounds(pos) {
            return Err(WorldError::OutOfBounds(pos, self.width, self.height));
        }
        self.cells[(pos.y * self.width + pos.x) as usize] = cell;
        Ok(())
    }

    /// Every in-bounds position, row by row.
    pub fn positions(&self) -> impl Iterator<Item = Pos> + '_ {
        (0..self.height).flat_map(move |y| (0..self.width).map(move |x| Pos::new(x, y)))
    }

    pub fn agent_pos(&self) -> Pos {
        self.agent_pos
    }

    pub fn agent_dir(&self) -> Dir {
        self.agent_dir
    }

    pub fn carrying(&self) -> Option<&Object> {
        self.carrying.as_ref()
    }

    /// Puts the agent at `pos` facing `dir`; the cell must be one it can stand on.
    pub fn place_agent(&mut self, pos: Pos, dir: Dir) -> Result<(), WorldError> {
        if !self.in_bounds(pos) {
            return Err(WorldError::OutOfBounds(pos, self.width, self.height));
        }
        if !self.cell(pos).is_passable() {
            return Err(WorldError::AgentBlocked(pos));
        }
        self.agent_pos = pos;
        self.agent_dir = dir;
        Ok(())
    }

    pub fn set_carrying(&mut self, object: Option<Object>) {
        self.carrying = object;
    }

    /// The cell the agent faces.
    pub fn front_pos(&self) -> Pos {
        self.agent_pos.step(self.agent_dir, 1)
    }

    pub fn front_cell(&self) -> &Cell {
        self.cell(self.front_pos())
    }

    /// Applies one action by the rules in the module docs.
    pub fn step(&mut self, action: Action) -> ActionEffect {
        let front = self.front_pos();
        match action {
            Action::TurnLeft => {
                self.agent_dir = self.agent_dir.left();
                ActionEffect::Turned { dir: self.agent_dir }
            }
            Action::TurnRight => {
                self.agent_dir = self.agent_dir.right();
                ActionEffect::Turned { dir: self.agent_dir }
            }
            Action::Forward => {
                if self.cell(front).is_passable() {
                    self.agent_pos = front;
                    ActionEffect::Moved { to: front }
                } else {
                    ActionEffect::Blocked { at: front }
                }
            }
            Action::PickUp => {
                if self.carrying.is_some() {
                    return ActionEffect::CannotPickUp { at: front };
                }
                match self.cell(front) {
                    Cell::Object(object) => {
                        let object = object.clone();
                        self.cells[(front.y * self.width + front.x) as usize] = Cell::Floor;
                        self.carrying = Some(object.clone());
                        ActionEffect::PickedUp { object, from: front }
                    }
                    _ => ActionEffect::CannotPickUp { at: front },
                }
            }
            Action::Drop => {
                // `front` is in bounds whenever it is floor: outside cells read as walls.
                if *self.cell(front) != Cell::Floor {
                    return ActionEffect::CannotDrop { at: front };
                }
                match self.carrying.take() {
                    Some(object) => {
                        self.cells[(front.y * self.width + front.x) as usize] = Cell::Object(object.clone());
                        ActionEffect::Dropped { object, at: front }
                    }
                    None => ActionEffect::CannotDrop { at: front },
                }
            }
            Action::Toggle => self.toggle(front),
            Action::Done => ActionEffect::Done,
        }
    }

    fn toggle(&mut self, front: Pos) -> ActionEffect {
        let index = (front.y * self.width + front.x) as usize;
        match self.cell(front).clone() {
            Cell::Door { color, state: DoorState::Locked } => {
                let has_key = self.carrying.as_ref().is_some_and(|o| o.kind == ObjectKind::Key && o.color == color);
                if has_key {
                    self.cells[index] = Cell::Door { color, state: DoorState::Open };
                    ActionEffect::Unlocked { color, at: front }
                } else {
                    ActionEffect::StillLocked { color, at: front }
                }
            }
            Cell::Door { color, state: DoorState::Closed } => {
                self.cells[index] = Cell::Door { color, state: DoorState::Open };
                ActionEffect::DoorOpened { color, at: front }
            }
            Cell::Door { color, state: DoorState::Open } => {
                self.cells[index] = Cell::Door { color, state: DoorState::Closed };
                ActionEffect::DoorClosed { color, at: front }
            }
            Cell::Object(Object { kind: ObjectKind::Box, color, contents }) => {
                let contents = contents.map(|b| *b);
                self.cells[index] = contents.clone().map_or(Cell::Floor, Cell::Object);
                ActionEffect::BoxOpened { color, at: front, contents }
            }
            _ => ActionEffect::NothingToToggle { at: front },
        }
    }

    /// The world position of the view cell `forward` ahead and `right` to the side.
    pub fn view_pos(&self, forward: i32, right: i32) -> Pos {
        self.agent_pos.step(self.agent_dir, forward).step(self.agent_dir.right(), right)
    }

    /// The agent's 7×7 view and what of it is visible.
    ///
    /// Occlusion follows MiniGrid's `process_vis`: starting from the agent's cell, row by row from
    /// the agent's row outwards, visibility spreads from every visible see-through cell to its
    /// neighbour on the right (sweeping left to right) and on the left (sweeping right to left),
    /// and to the cells straight and diagonally ahead of them. Walls and closed or locked doors are
    /// themselves seen but pass nothing on. This is what BabyAI agents see; it is more generous
    /// than ray casting: sight runs sideways along a row, so through one gap in a wall the whole
    /// row behind it shows.
    pub fn view(&self) -> View {
        let n = VIEW_SIZE as usize;
        let visible = propagate_sight(|f, c| self.cell(self.view_pos(f as i32, c as i32 - VIEW_HALF)).is_transparent());
        let mut cells = Vec::with_capacity(n * n);
        for (f, row) in visible.iter().enumerate() {
            for (c, &seen) in row.iter().enumerate() {
                let (forward, right) = (f as i32, c as i32 - VIEW_HALF);
                cells.push(ViewCell { forward, right, pos: self.view_pos(forward, right), visible: seen });
            }
        }
        View { cells }
    }

    /// The in-bounds world positions visible now (the agent's own cell included), sorted.
    pub fn visible_cells(&self) -> Vec<Pos> {
        let mut cells: Vec<Pos> =
            self.view().cells().iter().filter(|c| c.visible && self.in_bounds(c.pos)).map(|c| c.pos).collect();
        cells.sort();
        cells.dedup();
        cells
    }

    /// The whole map, two characters per cell (format of [`World::from_ascii`]), the agent as
    /// `>>`, `vv`, `<<` or `^^`, and a last line naming what it carries, if anything.
    pub fn render_ascii(&self) -> String {
        let mut out = String::with_capacity(((self.width * 2 + 1) * (self.height + 1)) as usize);
        for y in 0..self.height {
            for x in 0..self.width {
                let pos = Pos::new(x, y);
                let [a, b] = if pos == self.agent_pos { [self.agent_dir.arrow(); 2] } else { self.cell(pos).ascii() };
                out.push(a);
                out.push(b);
            }
            out.push('\n');
        }
        if let Some(object) = &self.carrying {
            out.push_str(&format!("carrying: {}\n", object.describe()));
        }
        out
    }
}

/// MiniGrid's `process_vis` over a 7×7 view: `visible[f][c]`, with `f` the rows forward (0 = the
/// agent's row) and `c` the columns from the agent's left (the agent at `VIEW_HALF`).
/// `transparent(f, c)` says whether sight passes through that view cell. Shared by the world's
/// view and by the expert, which predicts what it would see from elsewhere.
pub fn propagate_sight(transparent: impl Fn(usize, usize) -> bool) -> [[bool; VIEW_SIZE as usize]; VIEW_SIZE as usize] {
    let n = VIEW_SIZE as usize;
    let mut visible = [[false; VIEW_SIZE as usize]; VIEW_SIZE as usize];
    visible[0][VIEW_HALF as usize] = true;
    for f in 0..n {
        for c in 0..n - 1 {
            if !visible[f][c] || !transparent(f, c) {
                continue;
            }
            visible[f][c + 1] = true;
            if f + 1 < n {
                visible[f + 1][c + 1] = true;
                visible[f + 1][c] = true;
            }
        }
        for c in (1..n).rev() {
            if !visible[f][c] || !transparent(f, c) {
                continue;
            }
            visible[f][c - 1] = true;
            if f + 1 < n {
                visible[f + 1][c - 1] = true;
                visible[f + 1][c] = true;
            }
        }
    }
    visible
}
