//! The label rules.

use super::*;

#[test]
fn label_keys_and_values_obey_their_limits() {
    for good in ["a", "zone", "com.example/tier", "A-1_b.c", &"k".repeat(128)] {
        assert!(check_label(good, "v").is_ok(), "{good:?}");
    }
    for bad in ["", "-a", ".a", "/a", "a b", "a=b", "é", &"k".repeat(129)] {
        let why = check_label_key(bad).unwrap_err();
        assert!(why.starts_with("invalid label key"), "{bad:?}: {why}");
    }
    assert!(check_label("k", &"v".repeat(MAX_LABEL_VALUE)).is_ok());
    let why = check_label("k", &"v".repeat(MAX_LABEL_VALUE + 1)).unwrap_err();
    assert_eq!(why, "label \"k\": value of 4097 bytes is over the 4096-byte limit");
}
