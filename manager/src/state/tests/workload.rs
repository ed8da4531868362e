//! The workload identity settings' command.

use super::*;

#[test]
fn the_identity_lifetime_defaults_to_an_hour_and_is_set_within_bounds_only() {
    let before = empty();
    assert_eq!(refused(&before, &Command::SetIdentityTtl { secs: 600 }), Rejection::NotInitialised);
    let (view, _) = initialised();
    assert_eq!(view.identity_settings().unwrap().ttl().duration().as_secs(), 3600);
    apply(&view, &Command::SetIdentityTtl { secs: 600 }).unwrap();
    assert_eq!(view.identity_settings().unwrap().ttl().duration().as_secs(), 600);
    for secs in [0, 29, 30 * 86400 + 1, u64::MAX] {
        let r = refused(&view, &Command::SetIdentityTtl { secs });
        assert!(matches!(&r, Rejection::Invalid(m) if m.contains("30s to 30d")), "{secs}: {r:?}");
    }
    assert_eq!(view.identity_settings().unwrap().ttl_secs, 600);
}
