//! The grid world's rules: moving, turning, picking up, dropping, toggling, locked doors and keys,
//! and what the agent's view lets it see.

use apprentice_envs::babyai::world::{
    Action, ActionEffect, Cell, Color, Dir, DoorState, Object, ObjectKind, Pos, World, WorldError,
};

fn world(map: &str) -> World {
    World::from_ascii(map).expect("test map parses")
}

/// A corridor: agent, floor, open red door, closed red door, locked blue door, floor.
const CORRIDOR: &str = "
WWWWWWWWWWWWWWWW
WW>>..OrDrLb..WW
WWWWWWWWWWWWWWWW
";

#[test]
fn forward_moves_onto_floor_and_open_doors_only() {
    let mut w = world(CORRIDOR);
    assert_eq!(w.agent_pos(), Pos::new(1, 1));
    assert_eq!(w.step(Action::Forward), ActionEffect::Moved { to: Pos::new(2, 1) });
    assert_eq!(w.step(Action::Forward), ActionEffect::Moved { to: Pos::new(3, 1) }, "open door is walkable");
    assert_eq!(w.step(Action::Forward), ActionEffect::Blocked { at: Pos::new(4, 1) }, "closed door blocks");
    assert_eq!(w.agent_pos(), Pos::new(3, 1));
    assert_eq!(w.step(Action::Toggle), ActionEffect::DoorOpened { color: Color::Red, at: Pos::new(4, 1) });
    assert_eq!(w.step(Action::Forward), ActionEffect::Moved { to: Pos::new(4, 1) });
    assert_eq!(w.step(Action::Forward), ActionEffect::Blocked { at: Pos::new(5, 1) }, "locked door blocks");
    assert_eq!(w.step(Action::Toggle), ActionEffect::StillLocked { color: Color::Blue, at: Pos::new(5, 1) });
    assert_eq!(*w.cell(Pos::new(5, 1)), Cell::Door { color: Color::Blue, state: DoorState::Locked });
}

#[test]
fn forward_is_blocked_by_walls_objects_and_the_grid_edge() {
    let mut w = world(
        "
WWWWWWWW
WW>>AbWW
WW....WW
WWWWWWWW
",
    );
    assert_eq!(w.step(Action::Forward), ActionEffect::Blocked { at: Pos::new(2, 1) }, "a ball blocks");
    w.place_agent(Pos::new(2, 2), Dir::East).unwrap();
    assert_eq!(w.step(Action::Forward), ActionEffect::Blocked { at: Pos::new(3, 2) }, "a wall blocks");
    assert_eq!(w.agent_pos(), Pos::new(2, 2));

    // A map without walls: outside the grid reads as wall.
    let mut open = world("....\n^^..");
    assert_eq!(*open.cell(Pos::new(0, -1)), Cell::Wall);
    assert_eq!(open.step(Action::Forward), ActionEffect::Moved { to: Pos::new(0, 0) });
    assert_eq!(open.step(Action::Forward), ActionEffect::Blocked { at: Pos::new(0, -1) });
    assert_eq!(open.agent_pos(), Pos::new(0, 0));
}

#[test]
fn turning_cycles_through_the_four_directions() {
    let mut w = world(CORRIDOR);
    assert_eq!(w.agent_dir(), Dir::East);
    assert_eq!(w.step(Action::TurnRight), ActionEffect::Turned { dir: Dir::South });
    assert_eq!(w.step(Action::TurnRight), ActionEffect::Turned { dir: Dir::West });
    assert_eq!(w.step(Action::TurnRight), ActionEffect::Turned { dir: Dir::North });
    assert_eq!(w.step(Action::TurnRight), ActionEffect::Turned { dir: Dir::East });
    assert_eq!(w.step(Action::TurnLeft), ActionEffect::Turned { dir: Dir::North });
    assert_eq!(w.front_pos(), Pos::new(1, 0));
    assert_eq!(w.step(Action::TurnLeft), ActionEffect::Turned { dir: Dir::West });
    assert_eq!(w.front_pos(), Pos::new(0, 1));
    assert_eq!(w.agent_pos(), Pos::new(1, 1), "turning never moves");
    for d in Dir::ALL {
        assert_eq!(d.left().right(), d);
        assert_eq!(d.right().right().right().right(), d);
    }
}

#[test]
fn pick_up_needs_empty_hands_and_an_object_in_front() {
    let mut w = world(
        "
WWWWWWWWWW
WW>>Ar..WW
WW..Kb..WW
WWWWWWWWWW
",
    );
    assert_eq!(
        w.step(Action::PickUp),
        ActionEffect::PickedUp { object: Object::ball(Color::Red), from: Pos::new(2, 1) }
    );
    assert_eq!(*w.cell(Pos::new(2, 1)), Cell::Floor, "the ball left the grid");
    assert_eq!(w.carrying(), Some(&Object::ball(Color::Red)));

    // Hands full: the key stays where it is.
    w.place_agent(Pos::new(1, 2), Dir::East).unwrap();
    assert_eq!(w.step(Action::PickUp), ActionEffect::CannotPickUp { at: Pos::new(2, 2) });
    assert_eq!(*w.cell(Pos::new(2, 2)), Cell::Object(Object::key(Color::Blue)));
    assert_eq!(w.carrying(), Some(&Object::ball(Color::Red)));

    // Nothing to pick up: floor, walls, doors.
    let mut empty = world(CORRIDOR);
    assert_eq!(empty.step(Action::PickUp), ActionEffect::CannotPickUp { at: Pos::new(2, 1) });
    empty.place_agent(Pos::new(2, 1), Dir::East).unwrap();
    assert_eq!(empty.step(Action::PickUp), ActionEffect::CannotPickUp { at: Pos::new(3, 1) }, "doors stay");
    empty.step(Action::TurnLeft);
    assert_eq!(empty.step(Action::PickUp), ActionEffect::CannotPickUp { at: Pos::new(2, 0) }, "walls stay");
    assert_eq!(empty.carrying(), None);
}

#[test]
fn drop_needs_something_carried_and_plain_floor_in_front() {
    let mut w = world(
        "
WWWWWWWWWWWW
WW>>KgOr..WW
WW..GG....WW
WWWWWWWWWWWW
",
    );
    assert_eq!(w.step(Action::Drop), ActionEffect::CannotDrop { at: Pos::new(2, 1) }, "empty hands");
    w.set_carrying(Some(Object::ball(Color::Purple)));
    assert_eq!(w.step(Action::Drop), ActionEffect::CannotDrop { at: Pos::new(2, 1) }, "onto a key");
    w.place_agent(Pos::new(1, 2), Dir::East).unwrap();
    assert_eq!(w.step(Action::Drop), ActionEffect::CannotDrop { at: Pos::new(2, 2) }, "onto a goal");
    w.step(Action::TurnRight);
    assert_eq!(w.step(Action::Drop), ActionEffect::CannotDrop { at: Pos::new(1, 3) }, "onto a wall");
    assert_eq!(w.carrying(), Some(&Object::ball(Color::Purple)));

    w.place_agent(Pos::new(4, 2), Dir::North).unwrap();
    w.step(Action::TurnLeft);
    w.step(Action::TurnRight);
    // Front is (4, 1), floor.
    assert_eq!(w.step(Action::Drop), ActionEffect::Dropped { object: Object::ball(Color::Purple), at: Pos::new(4, 1) });
    assert_eq!(*w.cell(Pos::new(4, 1)), Cell::Object(Object::ball(Color::Purple)));
    assert_eq!(w.carrying(), None);

    // Not into an open doorway either.
    w.set_carrying(Some(Object::ball(Color::Red)));
    w.place_agent(Pos::new(3, 2), Dir::North).unwrap();
    assert_eq!(w.step(Action::Drop), ActionEffect::CannotDrop { at: Pos::new(3, 1) });
}

#[test]
fn a_locked_door_opens_only_with_the_key_of_its_colour_which_stays_in_hand() {
    let mut w = world(
        "
WWWWWWWWWW
WW..>>LbWW
WWWWWWWWWW
",
    );
    assert_eq!(w.step(Action::Toggle), ActionEffect::StillLocked { color: Color::Blue, at: Pos::new(3, 1) });
    w.set_carrying(Some(Object::key(Color::Red)));
    assert_eq!(w.step(Action::Toggle), ActionEffect::StillLocked { color: Color::Blue, at: Pos::new(3, 1) });
    w.set_carrying(Some(Object::ball(Color::Blue)));
    assert_eq!(w.step(Action::Toggle), ActionEffect::StillLocked { color: Color::Blue, at: Pos::new(3, 1) });
    w.set_carrying(Some(Object::key(Color::Blue)));
    assert_eq!(w.step(Action::Toggle), ActionEffect::Unlocked { color: Color::Blue, at: Pos::new(3, 1) });
    assert_eq!(*w.cell(Pos::new(3, 1)), Cell::Door { color: Color::Blue, state: DoorState::Open });
    assert_eq!(w.carrying(), Some(&Object::key(Color::Blue)), "the key stays in hand");
    // Once unlocked it is an ordinary door.
    assert_eq!(w.step(Action::Toggle), ActionEffect::DoorClosed { color: Color::Blue, at: Pos::new(3, 1) });
    w.set_carrying(None);
    assert_eq!(w.step(Action::Toggle), ActionEffect::DoorOpened { color: Color::Blue, at: Pos::new(3, 1) });
    assert_eq!(w.step(Action::Forward), ActionEffect::Moved { to: Pos::new(3, 1) });
}

#[test]
fn toggling_a_box_replaces_it_by_its_contents() {
    let mut w = world(
        "
WWWWWWWWWW
WW>>Bg..WW
WWWWWWWWWW
",
    );
    w.set(Pos::new(2, 1), Cell::Object(Object::boxed(Color::Green, Some(Object::key(Color::Red))))).unwrap();
    assert_eq!(
        w.step(Action::Toggle),
        ActionEffect::BoxOpened { color: Color::Green, at: Pos::new(2, 1), contents: Some(Object::key(Color::Red)) }
    );
    assert_eq!(*w.cell(Pos::new(2, 1)), Cell::Object(Object::key(Color::Red)));
    // A key does not react to toggle.
    assert_eq!(w.step(Action::Toggle), ActionEffect::NothingToToggle { at: Pos::new(2, 1) });

    let mut empty = world("WW>>BpWW");
    assert_eq!(
        empty.step(Action::Toggle),
        ActionEffect::BoxOpened { color: Color::Purple, at: Pos::new(2, 0), contents: None }
    );
    assert_eq!(*empty.cell(Pos::new(2, 0)), Cell::Floor, "an empty box vanishes");
    // A box can be carried like any object.
    let mut carry = world("WW>>BbWW");
    assert!(
        matches!(carry.step(Action::PickUp), ActionEffect::PickedUp { object, .. } if object.kind == ObjectKind::Box)
    );
}

#[test]
fn done_changes_nothing() {
    let mut w = world(CORRIDOR);
    let before = w.clone();
    assert_eq!(w.step(Action::Done), ActionEffect::Done);
    assert!(!ActionEffect::Done.changed_anything());
    assert_eq!(w, before);
}

#[test]
fn action_names_round_trip_and_six_are_offered() {
    for a in Action::ALL {
        assert_eq!(Action::from_name(a.name()), Some(a));
    }
    let offered: Vec<&str> = Action::OFFERED.iter().map(|a| a.name()).collect();
    assert_eq!(offered, ["turn left", "turn right", "go forward", "pick up", "drop", "toggle"]);
}

#[test]
fn ascii_maps_round_trip_and_bad_maps_are_refused() {
    let map = "WWWWWWWWWWWW\nWW..KrArBgWW\nWWOpDyLe..WW\nWWGG..vv..WW\nWWWWWWWWWWWW\n";
    let w = world(map);
    assert_eq!(w.render_ascii(), map);
    assert_eq!((w.width(), w.height()), (6, 5));
    assert_eq!(w.agent_dir(), Dir::South);
    assert_eq!(*w.cell(Pos::new(3, 2)), Cell::Door { color: Color::Grey, state: DoorState::Locked });

    assert!(matches!(World::from_ascii(""), Err(WorldError::BadAscii(_))));
    assert!(matches!(World::from_ascii("...."), Err(WorldError::BadAscii(m)) if m.contains("no agent")));
    assert!(matches!(World::from_ascii(">>>>"), Err(WorldError::BadAscii(m)) if m.contains("more than one")));
    assert!(matches!(World::from_ascii(">>..\n.."), Err(WorldError::BadAscii(m)) if m.contains("row 1")));
    assert!(matches!(World::from_ascii(">>Kz"), Err(WorldError::BadAscii(m)) if m.contains("Kz")));
    let mut carrying = world(">>..");
    carrying.set_carrying(Some(Object::key(Color::Yellow)));
    assert_eq!(carrying.render_ascii(), ">>..\ncarrying: yellow key\n");
}

#[test]
fn the_agent_may_only_stand_on_passable_cells_inside_the_grid() {
    let mut w = world(CORRIDOR);
    assert_eq!(w.place_agent(Pos::new(0, 0), Dir::East), Err(WorldError::AgentBlocked(Pos::new(0, 0))));
    assert_eq!(w.place_agent(Pos::new(4, 1), Dir::East), Err(WorldError::AgentBlocked(Pos::new(4, 1))));
    assert_eq!(w.place_agent(Pos::new(9, 1), Dir::East), Err(WorldError::OutOfBounds(Pos::new(9, 1), 8, 3)));
    assert_eq!(w.place_agent(Pos::new(3, 1), Dir::North), Ok(()), "an open door is fine");
    assert!(w.set(Pos::new(-1, 0), Cell::Floor).is_err());
}

/// A room with a wall across it at y = 4, open at x = 7 when `gap`, a ball right behind it at
/// (4, 3), a key at (5, 6), and the agent at (4, 7) facing north.
fn walled_off(gap: bool) -> World {
    let wall = if gap { "WWWWWWWWWWWWWW..WW" } else { "WWWWWWWWWWWWWWWWWW" };
    world(&format!(
        "
WWWWWWWWWWWWWWWWWW
WW..............WW
WW..............WW
WW......Ar......WW
{wall}
WW..............WW
WW........Kb....WW
WW......^^......WW
WWWWWWWWWWWWWWWWWW
"
    ))
}

#[test]
fn the_view_maps_relative_cells_to_world_positions() {
    let w = walled_off(false);
    assert_eq!(w.agent_pos(), Pos::new(4, 7));
    let view = w.view();
    assert_eq!(view.cells().len(), 49);
    let at = |f, r| view.get(f, r).expect("inside the view").pos;
    assert_eq!(at(0, 0), Pos::new(4, 7));
    assert_eq!(at(1, 0), Pos::new(4, 6), "forward is north");
    assert_eq!(at(0, 1), Pos::new(5, 7), "right is east");
    assert_eq!(at(6, -3), Pos::new(1, 1));
    assert!(view.get(7, 0).is_none() && view.get(0, 4).is_none() && view.get(-1, 0).is_none());

    let mut east = world("WW>>....WW");
    assert_eq!(east.view_pos(2, 1), Pos::new(3, 1), "facing east, right is south");
    east.step(Action::TurnLeft);
    assert_eq!(east.view_pos(2, 1), Pos::new(2, -2), "facing north, right is east");
}

#[test]
fn walls_block_sight_but_objects_do_not() {
    let w = walled_off(false);
    let visible = w.visible_cells();
    // Up to and including the wall: all seen, the key too.
    for pos in [Pos::new(4, 6), Pos::new(5, 6), Pos::new(1, 7), Pos::new(7, 5), Pos::new(4, 4), Pos::new(1, 4)] {
        assert!(visible.contains(&pos), "{pos} should be visible");
    }
    // The key at (5, 6) does not hide what is behind it.
    assert!(visible.contains(&Pos::new(5, 5)));
    // Nothing behind the wall.
    assert!(visible.iter().all(|p| p.y >= 4), "{visible:?}");
    assert!(visible.iter().all(|p| w.in_bounds(*p)));
    assert!(!w.view().is_visible(4, 0), "the ball's view cell");
}

#[test]
fn through_a_gap_sight_spreads_sideways_along_rows_as_in_minigrid() {
    // MiniGrid's process_vis lets visibility run along a row from any visible see-through cell,
    // so one gap at the end of the wall reveals the whole row behind it, ball included.
    let w = walled_off(true);
    let visible = w.visible_cells();
    assert!(visible.contains(&Pos::new(7, 3)), "straight through the gap");
    assert!(visible.contains(&Pos::new(4, 3)), "along the row behind the wall");
}

#[test]
fn closed_and_locked_doors_block_sight_open_doors_do_not() {
    let map = |door: &str| {
        format!(
            "
WWWWWWWWWWWWWW
WW....Ar....WW
WWWWWW{door}WWWWWW
WW..........WW
WW....^^....WW
WWWWWWWWWWWWWW
"
        )
    };
    let ball = Pos::new(3, 1);
    for (door, seen) in [("Dr", false), ("Lr", false), ("Or", true)] {
        let w = world(&map(door));
        assert!(w.visible_cells().contains(&Pos::new(3, 2)), "the door itself is seen ({door})");
        assert_eq!(w.visible_cells().contains(&ball), seen, "ball behind a `{door}` door");
    }
    // Opening the door reveals the ball.
    let mut w = world(&map("Dr"));
    w.step(Action::Forward);
    assert!(!w.visible_cells().contains(&ball));
    w.step(Action::Toggle);
    assert!(w.visible_cells().contains(&ball));
}

#[test]
fn the_view_reaches_six_cells_ahead_and_three_to_each_side() {
    let w = World::walled(20, 20);
    let mut w = w;
    w.place_agent(Pos::new(10, 10), Dir::North).unwrap();
    let visible = w.visible_cells();
    assert_eq!(visible.len(), 49, "an open field shows the whole 7x7 square");
    assert!(visible.contains(&Pos::new(7, 4)) && visible.contains(&Pos::new(13, 10)));
    assert!(!visible.contains(&Pos::new(10, 3)) && !visible.contains(&Pos::new(10, 11)));
    assert!(!visible.contains(&Pos::new(14, 10)) && !visible.contains(&Pos::new(6, 10)));
}
