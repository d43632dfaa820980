//! The BALROG-style text observation of hand-built scenes, as golden strings.

use apprentice_envs::babyai::observation::{describe, NOTHING_IN_SIGHT};
use apprentice_envs::babyai::world::{Action, Color, Dir, Object, Pos, World};

fn world(map: &str) -> World {
    World::from_ascii(map).expect("test map parses")
}

#[test]
fn the_reference_example() {
    // A pillar 2 ahead, the room's west wall 3 to the left, a red ball 1 right and 2 ahead; the
    // east wall is 4 to the right, beyond the side rays' reach of 3.
    let mut w = world(
        "
WWWWWWWWWWWWWWWW
WW............WW
WW....WWAr....WW
WW............WW
WW....^^......WW
WWWWWWWWWWWWWWWW
",
    );
    w.set_carrying(Some(Object::key(Color::Blue)));
    assert_eq!(
        describe(&w),
        "a wall 2 steps forward\n\
         a wall 3 steps left\n\
         a red ball 1 step right and 2 steps forward\n\
         You carry a blue key"
    );
}

#[test]
fn offsets_in_line_in_row_and_off_axis_with_singular_and_plural() {
    // Agent at (3, 5) facing north. A key straight ahead, a ball in the agent's row, a box and a
    // goal off both axes, doors in three states. The east wall is 4 to the right: not listed.
    // Order: nearest by steps (forward + sideways), then fewer steps forward, then left to right.
    let w = world(
        "
WWWWWWWWWWWWWWWW
WW............WW
WW..DgKe....OpWW
WW..........LyWW
WW..GG..Bb....WW
WWAp..^^......WW
WWWWWWWWWWWWWWWW
",
    );
    assert_eq!(
        describe(&w),
        "a wall 5 steps forward\n\
         a wall 3 steps left\n\
         a purple ball 2 steps left\n\
         a goal 1 step left and 1 step forward\n\
         a blue box 1 step right and 1 step forward\n\
         a grey key 3 steps forward\n\
         a closed green door 1 step left and 3 steps forward\n\
         a locked yellow door 3 steps right and 2 steps forward\n\
         an open purple door 3 steps right and 3 steps forward"
    );
}

#[test]
fn walls_are_reported_only_along_the_three_rays_and_only_the_nearest() {
    // Agent at (1, 2) facing east in a 5x5 room: the east wall 3 ahead, the north wall 2 to the
    // left, the south wall 2 to the right; the other wall cells in view are not listed.
    let w = world(
        "
WWWWWWWWWW
WW......WW
WW>>....WW
WW......WW
WWWWWWWWWW
",
    );
    assert_eq!(w.agent_pos(), Pos::new(1, 2));
    assert_eq!(describe(&w), "a wall 3 steps forward\na wall 2 steps left\na wall 2 steps right");
}

#[test]
fn a_closed_door_hides_what_is_behind_it_and_ends_the_forward_ray() {
    let mut w = world(
        "
WWWWWWWWWWWWWW
WW....Ar....WW
WWWWWWDrWWWWWW
WW..........WW
WW....^^....WW
WWWWWWWWWWWWWW
",
    );
    assert_eq!(describe(&w), "a wall 3 steps left\na wall 3 steps right\na closed red door 2 steps forward");
    w.step(Action::Forward);
    w.step(Action::Toggle);
    assert_eq!(
        describe(&w),
        "a wall 3 steps forward\n\
         a wall 3 steps left\n\
         a wall 3 steps right\n\
         an open red door 1 step forward\n\
         a red ball 2 steps forward"
    );
}

#[test]
fn an_object_in_the_way_does_not_stop_the_wall_ray() {
    let w = world(
        "
WWWWWWWWWWWW
WW>>Kr....WW
WWWWWWWWWWWW
",
    );
    assert_eq!(
        describe(&w),
        "a wall 4 steps forward\na wall 1 step left\na wall 1 step right\na red key 1 step forward"
    );
}

#[test]
fn nothing_in_sight_in_an_open_field() {
    let mut w = World::walled(20, 20);
    w.place_agent(Pos::new(10, 10), Dir::North).unwrap();
    assert_eq!(describe(&w), NOTHING_IN_SIGHT);
    w.set_carrying(Some(Object::ball(Color::Green)));
    assert_eq!(describe(&w), "You carry a green ball");
}

#[test]
fn the_text_turns_with_the_agent() {
    let mut w = world(
        "
WWWWWWWWWWWWWW
WW..........WW
WW....>>..AyWW
WW..........WW
WWWWWWWWWWWWWW
",
    );
    assert_eq!(
        describe(&w),
        "a wall 3 steps forward\na wall 2 steps left\na wall 2 steps right\na yellow ball 2 steps forward"
    );
    w.step(Action::TurnLeft);
    assert_eq!(
        describe(&w),
        "a wall 2 steps forward\na wall 3 steps left\na wall 3 steps right\na yellow ball 2 steps right"
    );
}
