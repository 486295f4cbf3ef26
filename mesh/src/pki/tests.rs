use super::*;

/// A seed (holds the CA) and a node that enrolled with it.
fn seed_and_member() -> (tempfile::TempDir, Arc<Trust>, tempfile::TempDir, Arc<Trust>) {
    let seed_dir = tempfile::tempdir().expect("tempdir");
    let ca = create_ca(seed_dir.path()).expect("ca");
    let seed = Trust::load(seed_dir.path(), Keypair::generate_ed25519(), None).expect("seed");
    assert!(seed.is_enrolled() && seed.can_issue());
    let member_dir = tempfile::tempdir().expect("tempdir");
    let member = Trust::load(member_dir.path(), Keypair::generate_ed25519(), Some(ca)).expect("member");
    assert!(!member.is_enrolled());
    let (ca_der, cert) = issue(&seed, &member.node_id()).expect("issues");
    member.accept_enrollment(&ca_der, &cert).expect("accepts");
    (seed_dir, seed, member_dir, member)
}

/// Issues with a correct proof of the test join key.
fn issue(seed: &Trust, node: &PeerId) -> Result<(Vec<u8>, Vec<u8>), PkiError> {
    seed.set_join_key(TEST_JOIN_KEY);
    seed.issue(node, &Trust::join_proof(&TEST_JOIN_KEY, node))
}

fn state_of(trust: &Trust) -> NodeState {
    NodeState { node_id: trust.node_id().to_string(), name: "n".into(), ..NodeState::default() }
}

#[test]
fn an_enrolled_node_is_a_member_to_the_seed_and_back() {
    let (_s, seed, _m, member) = seed_and_member();
    let member_cert = member.cert().expect("cert");
    assert_eq!(seed.verify_member(&member_cert, &[], Usage::Client), Ok(member.node_id()));
    let seed_cert = seed.cert().expect("cert");
    assert_eq!(member.verify_member(&seed_cert, &[], Usage::Server), Ok(seed.node_id()));
    assert_eq!(node_id_of(&member_cert).expect("id"), member.node_id());
}

#[test]
fn the_certificate_survives_a_restart_and_needs_no_issuer() {
    let (_s, _seed, member_dir, member) = seed_and_member();
    let again = Trust::load(member_dir.path(), member.keypair.clone(), None).expect("loads");
    assert!(again.is_enrolled());
    assert_eq!(again.cert(), member.cert());
}

#[test]
fn a_revoked_node_is_refused_everywhere_its_certificate_is_checked() {
    let (_s, seed, _m, member) = seed_and_member();
    let cert = member.cert().expect("cert");
    let signed = member.sign_state(&state_of(&member), true).expect("signs");
    assert!(seed.open_state(&signed, Some(member.node_id())).is_ok());
    seed.set_revoked([member.node_id().to_string()].into());
    assert_eq!(seed.verify_member(&cert, &[], Usage::Client), Err(PkiError::Revoked(member.node_id().to_string())));
    assert!(matches!(seed.open_state(&signed, Some(member.node_id())), Err(PkiError::Revoked(_))));
    // Nor does it get a new certificate for the same key.
    assert!(matches!(issue(&seed, &member.node_id()), Err(PkiError::Revoked(_))));
}

#[test]
fn a_certificate_from_another_cluster_is_untrusted() {
    let (_s, seed, _m, _member) = seed_and_member();
    let (_other_dir, other_seed, _od, outsider) = seed_and_member();
    let cert = outsider.cert().expect("cert");
    assert!(matches!(seed.verify_member(&cert, &[], Usage::Client), Err(PkiError::Untrusted(_))));
    assert!(matches!(
        seed.verify_member(&other_seed.cert().expect("cert"), &[], Usage::Server),
        Err(PkiError::Untrusted(_))
    ));
    // And another CA offered at enrollment is refused by fingerprint.
    let (ca_der, cert) = issue(&other_seed, &_member.node_id()).expect("issues");
    let fresh_dir = tempfile::tempdir().expect("tempdir");
    let expected = seed.ca_cert().map(|c| fingerprint(&c));
    let fresh = Trust::load(fresh_dir.path(), _member.keypair.clone(), expected).expect("loads");
    assert!(matches!(fresh.accept_enrollment(&ca_der, &cert), Err(PkiError::WrongCa { .. })));
    assert!(!fresh.is_enrolled());
}

#[test]
fn a_certificate_for_someone_elses_key_is_not_accepted_as_ours() {
    let (_s, seed, _m, member) = seed_and_member();
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = seed.ca_cert().map(|c| fingerprint(&c));
    let thief = Trust::load(dir.path(), Keypair::generate_ed25519(), expected).expect("loads");
    let (ca_der, cert) = issue(&seed, &member.node_id()).expect("issues");
    assert!(matches!(thief.accept_enrollment(&ca_der, &cert), Err(PkiError::Invalid(_))));
}

#[test]
fn tampered_unsigned_or_misattributed_states_are_dropped() {
    let (_s, seed, _m, member) = seed_and_member();
    let good = member.sign_state(&state_of(&member), true).expect("signs");
    assert_eq!(seed.open_state(&good, Some(member.node_id())).expect("opens").name, "n");

    let mut tampered = good.clone();
    tampered.state = NodeState { name: "evil".into(), ..state_of(&member) }.encode_to_vec();
    assert!(matches!(seed.open_state(&tampered, Some(member.node_id())), Err(PkiError::BadState(_))));

    let unsigned = SignedNodeState { signature: Vec::new(), ..good.clone() };
    assert!(seed.open_state(&unsigned, Some(member.node_id())).is_err());
    assert!(seed.open_state(&SignedNodeState::default(), Some(member.node_id())).is_err());

    // A member speaking for the seed: its own certificate, the seed's id.
    let impostor = member.sign_state(&state_of(&seed), true).expect("signs");
    assert!(matches!(seed.open_state(&impostor, Some(member.node_id())), Err(PkiError::BadState(_))));
    // A valid state relayed under another author.
    assert!(matches!(seed.open_state(&good, Some(seed.node_id())), Err(PkiError::BadState(_))));
}

#[test]
fn a_state_without_its_certificate_opens_once_the_authors_is_held() {
    let (_s, seed, _m, member) = seed_and_member();
    let bare = member.sign_state(&state_of(&member), false).expect("signs");
    assert!(bare.cert.is_empty());
    let unknown = seed.open_state(&bare, Some(member.node_id()));
    assert_eq!(unknown, Err(PkiError::CertUnknown(member.node_id())));
    // Published by someone else than the node it names: dropped, not
    // fetched for.
    assert!(matches!(seed.open_state(&bare, Some(seed.node_id())), Err(PkiError::BadState(_))));
    assert!(seed.with_cert(bare.clone(), &member.node_id()).is_none(), "nothing to attach yet");

    // One state with the certificate, and the bare ones open after it.
    let full = member.sign_state(&state_of(&member), true).expect("signs");
    seed.open_state(&full, Some(member.node_id())).expect("opens");
    assert_eq!(seed.open_state(&bare, Some(member.node_id())).expect("opens").name, "n");
    assert_eq!(seed.with_cert(bare.clone(), &member.node_id()), Some(full.clone()));

    // The held certificate is still checked: revocation, tampering and
    // another author's name all fail as they do with a carried one.
    let mut tampered = bare.clone();
    tampered.state = NodeState { name: "evil".into(), ..state_of(&member) }.encode_to_vec();
    assert!(matches!(seed.open_state(&tampered, Some(member.node_id())), Err(PkiError::BadState(_))));
    assert!(matches!(seed.open_state(&bare, Some(seed.node_id())), Err(PkiError::BadState(_))));
    // A bare state naming the seed, signed by the member's key.
    let impostor = member.sign_state(&state_of(&seed), false).expect("signs");
    assert!(seed.open_state(&impostor, None).is_err());
    seed.set_revoked([member.node_id().to_string()].into());
    assert!(matches!(seed.open_state(&bare, Some(member.node_id())), Err(PkiError::Revoked(_))));
}

#[test]
fn an_unenrolled_node_trusts_nobody_and_signs_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lone = Trust::load(dir.path(), Keypair::generate_ed25519(), Some([7; 32])).expect("loads");
    assert!(lone.sign_state(&state_of(&lone), true).is_none());
    let (_s, _seed, _m, member) = seed_and_member();
    assert_eq!(lone.verify_member(&member.cert().expect("cert"), &[], Usage::Client), Err(PkiError::NotEnrolled));
}

#[test]
fn a_certificate_needs_a_proof_of_the_current_join_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_ca(dir.path()).expect("ca");
    let seed = Trust::load(dir.path(), Keypair::generate_ed25519(), None).expect("seed");
    let joiner = Keypair::generate_ed25519().public().to_peer_id();
    let other = Keypair::generate_ed25519().public().to_peer_id();
    let old = [1u8; 32];
    // Not started yet: no join key known, nothing issued.
    assert_eq!(seed.issue(&joiner, &Trust::join_proof(&old, &joiner)), Err(PkiError::NotReady));
    seed.set_join_key(old);
    assert!(seed.issue(&joiner, &Trust::join_proof(&old, &joiner)).is_ok());
    // A proof made for another node id is worthless.
    assert_eq!(seed.issue(&other, &Trust::join_proof(&old, &joiner)), Err(PkiError::BadJoinProof));
    assert_eq!(seed.issue(&other, b""), Err(PkiError::BadJoinProof));
    // After a rotation the old token no longer admits anyone.
    let new = [2u8; 32];
    seed.set_join_key(new);
    assert_eq!(seed.issue(&other, &Trust::join_proof(&old, &other)), Err(PkiError::BadJoinProof));
    assert!(seed.issue(&other, &Trust::join_proof(&new, &other)).is_ok());
}
