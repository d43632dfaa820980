//! Lenient reading of a model's free-form answer into one action.
//!
//! Models answer "I will go forward.", "Action: turn left", "**pick up** the key", or reason at
//! length first. The rules, in order:
//! 1. The answer is lowercased; `*`, `` ` `` and quotes are dropped and `_` becomes a space, so
//!    markdown and JSON (`{"action": "turn_left"}`) read like plain text.
//! 2. If it contains a marker — `action:`, `answer:` (so also "final answer:", "next action:") or
//!    `<action>` — the text after the last marker is searched, and the *first* action mentioned
//!    there wins: what follows a marker is the answer, and any reasoning comes after it.
//! 3. Otherwise (or if the marked text names no action) the whole answer is searched and the
//!    *last* action mentioned wins: reasoning comes first and the decision last.
//!
//! Words are matched whole, the longest phrase at each position (so "turn left" is one mention,
//! not "turn" + "left"). Synonyms: left/right ("rotate left", "left", "anticlockwise"), forward
//! ("move forward", "ahead", "straight", "advance"), pick up ("pickup", "pick", "grab", "take",
//! "collect"), drop ("put down", "release", "place"), toggle ("open", "close", "unlock", "use",
//! "interact"). A mention within two words after a negation ("not", "don't", "never", "avoid")
//! or three after "instead of" is ignored. `done` counts only as the whole answer, because
//! "done" occurs in ordinary sentences. `None` means no action could be read.

use super::world::Action;

/// Phrases that name an action, as word sequences.
const PHRASES: &[(&[&str], Action)] = &[
    (&["turn", "left"], Action::TurnLeft),
    (&["turn", "to", "the", "left"], Action::TurnLeft),
    (&["turn", "to", "left"], Action::TurnLeft),
    (&["rotate", "left"], Action::TurnLeft),
    (&["rotate", "to", "the", "left"], Action::TurnLeft),
    (&["turnleft"], Action::TurnLeft),
    (&["left", "turn"], Action::TurnLeft),
    (&["left"], Action::TurnLeft),
    (&["counterclockwise"], Action::TurnLeft),
    (&["counter", "clockwise"], Action::TurnLeft),
    (&["anticlockwise"], Action::TurnLeft),
    (&["anti", "clockwise"], Action::TurnLeft),
    (&["turn", "right"], Action::TurnRight),
    (&["turn", "to", "the", "right"], Action::TurnRight),
    (&["turn", "to", "right"], Action::TurnRight),
    (&["rotate", "right"], Action::TurnRight),
    (&["rotate", "to", "the", "right"], Action::TurnRight),
    (&["turnright"], Action::TurnRight),
    (&["right", "turn"], Action::TurnRight),
    (&["right"], Action::TurnRight),
    (&["clockwise"], Action::TurnRight),
    (&["go", "forward"], Action::Forward),
    (&["move", "forward"], Action::Forward),
    (&["goforward"], Action::Forward),
    (&["forward"], Action::Forward),
    (&["forwards"], Action::Forward),
    (&["ahead"], Action::Forward),
    (&["straight"], Action::Forward),
    (&["advance"], Action::Forward),
    (&["pick", "up"], Action::PickUp),
    (&["pickup"], Action::PickUp),
    (&["pick"], Action::PickUp),
    (&["grab"], Action::PickUp),
    (&["take"], Action::PickUp),
    (&["collect"], Action::PickUp),
    (&["drop"], Action::Drop),
    (&["put", "down"], Action::Drop),
    (&["release"], Action::Drop),
    (&["place"], Action::Drop),
    (&["toggle"], Action::Toggle),
    (&["open"], Action::Toggle),
    (&["close"], Action::Toggle),
    (&["unlock"], Action::Toggle),
    (&["use"], Action::Toggle),
    (&["interact"], Action::Toggle),
];

/// Words that cancel a mention right after them (apostrophes are dropped: "don't" reads "dont").
const NEGATIONS: &[&str] =
    &["not", "dont", "doesnt", "didnt", "cant", "cannot", "wont", "shouldnt", "never", "avoid", "without"];

const MARKERS: &[&str] = &["<action>", "action:", "answer:"];

/// Reads one action from a free-form answer by the rules in the module docs.
pub fn parse_action(answer: &str) -> Option<Action> {
    let text: String =
        answer.to_lowercase().chars().filter(|c| !matches!(c, '*' | '`' | '"' | '\'' | '\u{2019}')).collect();
    let text = text.replace('_', " ");
    let all_words = words(&text);
    if all_words == ["done"] {
        return Some(Action::Done);
    }
    let marked = MARKERS.iter().filter_map(|m| text.rfind(m).map(|at| at + m.len())).max();
    if let Some(start) = marked {
        if let Some(&action) = mentions(&words(&text[start..])).first() {
            return Some(action);
        }
    }
    mentions(&all_words).last().copied()
}

/// Lowercase alphanumeric words; everything else separates them.
fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect()
}

/// Every action mentioned, in order, skipping negated mentions.
fn mentions(words: &[&str]) -> Vec<Action> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let best =
            PHRASES.iter().filter(|(phrase, _)| words[i..].starts_with(phrase)).max_by_key(|(phrase, _)| phrase.len());
        match best {
            Some((phrase, action)) => {
                if !negated(&words[..i]) {
                    found.push(*action);
                }
                i += phrase.len();
            }
            None => i += 1,
        }
    }
    found
}

/// Whether the words before a mention negate it: a negation among the last two words, or
/// "instead of" among the last three ("instead of going forward").
fn negated(before: &[&str]) -> bool {
    let last_two = &before[before.len().saturating_sub(2)..];
    let last_three = &before[before.len().saturating_sub(3)..];
    last_two.iter().any(|w| NEGATIONS.contains(w)) || last_three.windows(2).any(|pair| pair == ["instead", "of"])
}
