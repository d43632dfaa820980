//! Missions: their text, parsing it back, and the verifier's success and failure rules for every
//! kind of act and both sequence forms.

use apprentice_envs::babyai::mission::{parse_instr, Act, Article, Instr, ObjDesc, ObjType, Status, Verifier};
use apprentice_envs::babyai::world::{Action, Cell, Color, Dir, DoorState, Object, Pos, World};

fn world(map: &str) -> World {
    World::from_ascii(map).expect("test map parses")
}

fn the(color: Color, kind: ObjType) -> ObjDesc {
    ObjDesc::the(color, kind)
}

/// Plays `actions`, returning the verifier's status after each.
fn play(w: &mut World, v: &mut Verifier, actions: &[Action]) -> Vec<Status> {
    actions
        .iter()
        .map(|&a| {
            let effect = w.step(a);
            v.update(w, &effect)
        })
        .collect()
}

use Status::{Failure, InProgress, Success};

#[test]
fn mission_text_follows_the_grammar() {
    let red_ball = the(Color::Red, ObjType::Ball);
    let a_box = ObjDesc::new(Article::A, None, Some(ObjType::Box));
    let blue_key = the(Color::Blue, ObjType::Key);
    let cases = [
        (Instr::Single(Act::GoTo(red_ball)), "go to the red ball"),
        (Instr::Single(Act::PickUp(a_box)), "pick up a box"),
        (Instr::Single(Act::Open(ObjDesc::new(Article::The, None, Some(ObjType::Door)))), "open the door"),
        (
            Instr::Single(Act::PutNext(red_ball, ObjDesc::new(Article::A, Some(Color::Yellow), None))),
            "put the red ball next to a yellow object",
        ),
        (Instr::Then(Act::PickUp(red_ball), Act::GoTo(a_box)), "pick up the red ball, then go to a box"),
        (Instr::After(Act::GoTo(blue_key), Act::PickUp(red_ball)), "go to the blue key after you pick up the red ball"),
    ];
    for (instr, text) in cases {
        assert_eq!(instr.text(), text);
        assert_eq!(parse_instr(text), Ok(instr), "parsing `{text}`");
    }
}

#[test]
fn after_you_means_the_second_act_first() {
    let instr = Instr::After(Act::GoTo(the(Color::Blue, ObjType::Key)), Act::PickUp(the(Color::Red, ObjType::Ball)));
    assert_eq!(
        instr.acts_in_order(),
        vec![Act::PickUp(the(Color::Red, ObjType::Ball)), Act::GoTo(the(Color::Blue, ObjType::Key))]
    );
}

#[test]
fn malformed_missions_are_refused() {
    for text in [
        "",
        "go to red ball",
        "go to the crimson ball",
        "go to the red dragon",
        "open the red ball",
        "put the red ball beside the key",
        "jump over the red ball",
        "go to the big red ball",
    ] {
        assert!(parse_instr(text).is_err(), "`{text}` should not parse");
    }
}

#[test]
fn descriptors_match_by_kind_and_colour_and_object_matches_anything() {
    let any_red = ObjDesc::new(Article::A, Some(Color::Red), None);
    assert!(any_red.matches_cell(&Cell::Object(Object::key(Color::Red))));
    assert!(any_red.matches_cell(&Cell::Door { color: Color::Red, state: DoorState::Open }));
    assert!(!any_red.matches_cell(&Cell::Object(Object::key(Color::Blue))));
    assert!(!any_red.matches_cell(&Cell::Wall));
    let a_ball = ObjDesc::new(Article::A, None, Some(ObjType::Ball));
    assert!(a_ball.matches_object(&Object::ball(Color::Grey)));
    assert!(!a_ball.matches_object(&Object::key(Color::Grey)));
}

/// Red ball (2, 1), blue key (4, 1), green box (3, 3), locked red door (4, 3); the agent at
/// (1, 3) facing east.
const ROOM: &str = "
WWWWWWWWWWWW
WW..Ar..KbWW
WW........WW
WW>>..BgLrWW
WWWWWWWWWWWW
";

#[test]
fn go_to_succeeds_when_a_matching_object_is_in_front() {
    let mut w = world(ROOM);
    let mut v = Verifier::new(&Instr::Single(Act::GoTo(the(Color::Red, ObjType::Ball))));
    assert_eq!(
        play(&mut w, &mut v, &[Action::Forward, Action::TurnLeft, Action::Forward]),
        [InProgress, InProgress, Success]
    );
    assert_eq!(w.front_pos(), Pos::new(2, 1));
    assert_eq!(v.completed(), 1);
    // Once succeeded it stays so, whatever follows.
    assert_eq!(play(&mut w, &mut v, &[Action::TurnLeft]), [Success]);
}

#[test]
fn go_to_does_not_count_other_objects_and_accepts_doors() {
    let mut w = world(ROOM);
    let mut v = Verifier::new(&Instr::Single(Act::GoTo(the(Color::Red, ObjType::Ball))));
    assert_eq!(play(&mut w, &mut v, &[Action::Forward, Action::Done]), [InProgress, InProgress]);
    assert_eq!(w.front_cell(), &Cell::Object(Object::boxed(Color::Green, None)), "facing the green box");

    let mut v = Verifier::new(&Instr::Single(Act::GoTo(the(Color::Red, ObjType::Door))));
    w.place_agent(Pos::new(3, 2), Dir::South).unwrap();
    assert_eq!(play(&mut w, &mut v, &[Action::Done]), [InProgress]);
    w.place_agent(Pos::new(4, 2), Dir::South).unwrap();
    assert_eq!(play(&mut w, &mut v, &[Action::Done]), [Success]);
}

#[test]
fn pick_up_succeeds_only_on_picking_a_matching_object() {
    let mut w = world(ROOM);
    let mut v = Verifier::new(&Instr::Single(Act::PickUp(the(Color::Green, ObjType::Box))));
    assert_eq!(play(&mut w, &mut v, &[Action::PickUp]), [InProgress], "nothing in front");
    assert_eq!(play(&mut w, &mut v, &[Action::Forward, Action::PickUp]), [InProgress, Success]);

    let pick_red_ball = Instr::Single(Act::PickUp(the(Color::Red, ObjType::Ball)));
    let mut w = world(ROOM);
    let mut v = Verifier::new(&pick_red_ball);
    w.place_agent(Pos::new(3, 1), Dir::East).unwrap();
    assert_eq!(play(&mut w, &mut v, &[Action::PickUp]), [InProgress], "picked the blue key instead");

    // Holding a matching object is not picking it up.
    let mut w = world(ROOM);
    let mut v = Verifier::new(&pick_red_ball);
    w.set_carrying(Some(Object::ball(Color::Red)));
    assert_eq!(play(&mut w, &mut v, &[Action::Done, Action::TurnLeft]), [InProgress, InProgress]);
}

#[test]
fn open_succeeds_when_a_matching_door_is_opened_by_toggle() {
    let open_red = Instr::Single(Act::Open(the(Color::Red, ObjType::Door)));
    let mut w = world(ROOM);
    w.place_agent(Pos::new(4, 2), Dir::South).unwrap();
    let mut v = Verifier::new(&open_red);
    assert_eq!(play(&mut w, &mut v, &[Action::Toggle]), [InProgress], "locked, no key");
    w.set_carrying(Some(Object::key(Color::Blue)));
    assert_eq!(play(&mut w, &mut v, &[Action::Toggle]), [InProgress], "wrong key");
    w.set_carrying(Some(Object::key(Color::Red)));
    assert_eq!(play(&mut w, &mut v, &[Action::Toggle]), [Success], "unlocked with its key");

    // Closing an open door is not opening it; opening it again is.
    let mut v = Verifier::new(&open_red);
    assert_eq!(play(&mut w, &mut v, &[Action::Toggle, Action::Toggle]), [InProgress, Success]);

    // Opening another door does not count.
    let mut w = world("WW>>DbLrWW");
    let mut v = Verifier::new(&open_red);
    assert_eq!(play(&mut w, &mut v, &[Action::Toggle]), [InProgress]);
}

#[test]
fn put_next_to_succeeds_when_the_object_is_dropped_orthogonally_beside_the_target() {
    let instr = Instr::Single(Act::PutNext(the(Color::Red, ObjType::Ball), the(Color::Green, ObjType::Box)));
    let holding_red_ball_at = |pos: Pos| {
        let mut w = world(ROOM);
        w.set(Pos::new(2, 1), Cell::Floor).unwrap();
        w.set_carrying(Some(Object::ball(Color::Red)));
        w.place_agent(pos, Dir::East).unwrap();
        w
    };
    // From (2, 2) facing east the drop lands on (3, 2), right above the box at (3, 3).
    let mut w = holding_red_ball_at(Pos::new(2, 2));
    let mut v = Verifier::new(&instr);
    assert_eq!(play(&mut w, &mut v, &[Action::Drop]), [Success]);

    // From (1, 2) it lands on (2, 2), diagonal to the box: not next to it.
    let mut w = holding_red_ball_at(Pos::new(1, 2));
    let mut v = Verifier::new(&instr);
    assert_eq!(play(&mut w, &mut v, &[Action::Drop]), [InProgress]);
    // Pick it up again, step forward and drop it above the box.
    assert_eq!(
        play(&mut w, &mut v, &[Action::PickUp, Action::Forward, Action::Drop]),
        [InProgress, InProgress, Success]
    );

    // The wrong object dropped beside the box does not count.
    let mut w = world(ROOM);
    w.set_carrying(Some(Object::ball(Color::Blue)));
    w.place_agent(Pos::new(2, 2), Dir::East).unwrap();
    let mut v = Verifier::new(&instr);
    assert_eq!(play(&mut w, &mut v, &[Action::Drop]), [InProgress]);
}

#[test]
fn sequences_complete_in_order_in_both_forms() {
    let pick = Act::PickUp(the(Color::Red, ObjType::Ball));
    let go = Act::GoTo(the(Color::Blue, ObjType::Key));
    for instr in [Instr::Then(pick, go), Instr::After(go, pick)] {
        let mut w = world(ROOM);
        w.place_agent(Pos::new(4, 2), Dir::West).unwrap();
        let mut v = Verifier::new(&instr);
        // Facing the blue key first does not count: the pick-up comes first.
        assert_eq!(play(&mut w, &mut v, &[Action::TurnRight]), [InProgress], "{instr}");
        assert_eq!(v.completed(), 0);
        let to_ball = [Action::TurnLeft, Action::Forward, Action::Forward, Action::TurnRight, Action::PickUp];
        assert_eq!(play(&mut w, &mut v, &to_ball), [InProgress; 5], "{instr}");
        assert_eq!(v.completed(), 1);
        assert_eq!(v.current(), Some(&go));
        let to_key = [Action::TurnRight, Action::Forward, Action::Forward, Action::TurnLeft];
        assert_eq!(play(&mut w, &mut v, &to_key), [InProgress, InProgress, InProgress, Success], "{instr}");
    }
}

#[test]
fn a_completed_act_lets_the_next_one_be_checked_on_the_same_step() {
    // "open the red door, then go to the red door": the toggle that opens it leaves it in front.
    let door = the(Color::Red, ObjType::Door);
    let mut w = world(ROOM);
    w.place_agent(Pos::new(4, 2), Dir::South).unwrap();
    w.set_carrying(Some(Object::key(Color::Red)));
    let mut v = Verifier::new(&Instr::Then(Act::Open(door), Act::GoTo(door)));
    assert_eq!(play(&mut w, &mut v, &[Action::Toggle]), [Success]);
    assert_eq!(v.completed(), 2);
}

#[test]
fn one_event_completes_one_act_only() {
    let a_ball = ObjDesc::new(Article::A, None, Some(ObjType::Ball));
    let mut w = world("WW>>ArAbWW");
    let mut v = Verifier::new(&Instr::Then(Act::PickUp(a_ball), Act::PickUp(a_ball)));
    assert_eq!(play(&mut w, &mut v, &[Action::PickUp]), [InProgress]);
    assert_eq!(v.completed(), 1);
    assert_eq!(play(&mut w, &mut v, &[Action::Drop, Action::PickUp]), [InProgress, Success]);
}

#[test]
fn the_mission_fails_when_something_it_needs_is_gone() {
    // Toggling the empty green box makes it vanish: "pick up the green box" can never succeed.
    let mut w = world(ROOM);
    let mut v = Verifier::new(&Instr::Single(Act::PickUp(the(Color::Green, ObjType::Box))));
    assert_eq!(play(&mut w, &mut v, &[Action::Forward, Action::Toggle]), [InProgress, Failure]);
    assert_eq!(play(&mut w, &mut v, &[Action::TurnLeft]), [Failure], "failure is final");
    // A held object still counts as existing.
    let mut w = world(ROOM);
    let mut v = Verifier::new(&Instr::Single(Act::GoTo(the(Color::Red, ObjType::Ball))));
    w.set(Pos::new(2, 1), Cell::Floor).unwrap();
    w.set_carrying(Some(Object::ball(Color::Red)));
    assert_eq!(play(&mut w, &mut v, &[Action::Done]), [InProgress]);
}
