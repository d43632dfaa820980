//! Lenient parsing of free-form answers: a table of messy answers as models write them.

use apprentice_envs::babyai::parse::parse_action;
use apprentice_envs::babyai::world::Action;

use Action::{Done, Drop, Forward, PickUp, Toggle, TurnLeft, TurnRight};

#[test]
fn messy_answers() {
    let table: &[(&str, Option<Action>)] = &[
        // Exact names, any case, with punctuation.
        ("turn left", Some(TurnLeft)),
        ("Turn Right", Some(TurnRight)),
        ("GO FORWARD", Some(Forward)),
        ("pick up", Some(PickUp)),
        ("drop.", Some(Drop)),
        ("toggle!", Some(Toggle)),
        ("done", Some(Done)),
        // Markers, markdown, JSON, tags.
        ("Action: turn left", Some(TurnLeft)),
        ("**Action:** go forward", Some(Forward)),
        ("`pick up`", Some(PickUp)),
        ("{\"action\": \"turn_right\"}", Some(TurnRight)),
        ("<action>toggle</action>", Some(Toggle)),
        ("Final answer: drop", Some(Drop)),
        // Sentences and synonyms.
        ("I will go forward.", Some(Forward)),
        ("pick up the key", Some(PickUp)),
        ("move forward", Some(Forward)),
        ("rotate left", Some(TurnLeft)),
        ("forward", Some(Forward)),
        ("Let's turn to the right.", Some(TurnRight)),
        ("open the door", Some(Toggle)),
        ("grab the red ball", Some(PickUp)),
        ("put down the ball", Some(Drop)),
        ("Take one step forward", Some(Forward)),
        ("turnleft", Some(TurnLeft)),
        ("1. go forward", Some(Forward)),
        // Reasoning first: the last action mentioned wins.
        ("The ball is to my left, so I should go forward", Some(Forward)),
        ("I could go forward, but the key is behind me. I'll turn right.", Some(TurnRight)),
        // After a marker the first action wins, whatever reasoning follows.
        ("Action: go forward (turning left would face the wall)", Some(Forward)),
        // Negated mentions are ignored.
        ("Don't go forward; turn left.", Some(TurnLeft)),
        ("I will turn right instead of going forward", Some(TurnRight)),
        ("turn left. do not pick up anything yet", Some(TurnLeft)),
        // Unreadable.
        ("", None),
        ("hmm", None),
        ("I am not sure what to do.", None),
        ("go to the red ball", None),
        ("I'm done thinking about it", None),
    ];
    assert!(table.len() >= 20);
    let mut wrong = Vec::new();
    for &(answer, expected) in table {
        let got = parse_action(answer);
        if got != expected {
            wrong.push(format!("{answer:?}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "misparsed:\n{}", wrong.join("\n"));
}

#[test]
fn every_offered_action_name_parses_to_itself() {
    for action in Action::OFFERED {
        assert_eq!(parse_action(action.name()), Some(action));
        assert_eq!(parse_action(&format!("  {}\n", action.name().to_uppercase())), Some(action));
    }
}
