//! Join token grammar: `JoinToken::from_str` on arbitrary text.
//!
//! Never panics; a token that parses prints (with its secret exposed) to text
//! that parses back to the same token, and its `Display`/`Debug` never hold the
//! secret part (they print it redacted), nor parse as a token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarmd_certs::JoinToken;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(token) = text.parse::<JoinToken>() else { return };
    let exposed = token.expose();
    let again: JoinToken = exposed.parse().expect("an exposed token parses");
    assert!(again.ct_matches(&token), "round trip changed the token");
    assert_eq!(again.ca_digest(), token.ca_digest());
    assert_eq!(exposed.as_str(), again.expose().as_str(), "exposed form is not canonical");
    // Display is exactly the exposed form with the secret replaced (the
    // secret's hex may well occur inside the digest's: compare whole strings).
    let secret = exposed.rsplit('-').next().expect("a secret part");
    let redacted = format!("{}<redacted>", &exposed[..exposed.len() - secret.len()]);
    assert_eq!(token.to_string(), redacted, "Display does not redact the secret");
    assert_eq!(format!("{token:?}"), format!("JoinToken({redacted})"), "Debug does not redact the secret");
    assert!(token.to_string().parse::<JoinToken>().is_err(), "the redacted form parses as a token");
});
