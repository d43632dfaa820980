//! Every id apprentice mints is a UUIDv7, so ids sort in the order things happened.

use uuid::Uuid;

/// Mints a new time-ordered id (inference, episode, feedback).
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// The creation time encoded in a UUIDv7, if the id is one.
pub fn timestamp_of(id: &Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    let ts = id.get_timestamp()?;
    let (secs, nanos) = ts.to_unix();
    chrono::DateTime::from_timestamp(secs as i64, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_and_time_ordered() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id();
        assert_eq!(a.get_version_num(), 7);
        assert!(a < b, "later id must sort after earlier id");
        assert!(a.to_string() < b.to_string(), "text form must sort too");
        let t = timestamp_of(&a).expect("v7 carries a timestamp");
        assert!((chrono::Utc::now() - t).num_seconds().abs() < 60);
    }
}
