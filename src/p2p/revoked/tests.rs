use super::*;

const CLUSTER: &str = "0123456789abcdef";

fn valid_peer() -> PeerId {
    Keypair::generate_ed25519().public().to_peer_id()
}

/// A peer id on a short identity multihash: no key at all, and it sorts before every real one.
fn made_up_peer(n: u16) -> PeerId {
    let [high, low] = n.to_be_bytes();
    PeerId::from_bytes(&[0x00, 2, high, low]).unwrap()
}

fn record(signer: &Keypair, cluster: &str, peer: PeerId) -> Vec<u8> {
    let revocation = Revocation { cluster_id: cluster.into(), peer: peer.to_bytes(), revoked_at: 1 };
    signed::seal::<_, MAX_REVOCATION_BYTES>(&revocation, signer).unwrap()
}

fn anyone(_: &PeerId) -> bool {
    true
}

#[test]
fn only_ed25519_peer_ids_can_be_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let mut revoked = RevokedPeers::load(dir.path(), CLUSTER, &keypair);
    assert!(is_ed25519(&valid_peer()));
    for bogus in [made_up_peer(1), PeerId::random()] {
        assert!(!is_ed25519(&bogus), "{bogus}");
        assert!(matches!(revoked.revoke(bogus, &keypair), Err(RevocationError::NotEd25519(_))));
        let from_a_member = record(&Keypair::generate_ed25519(), CLUSTER, bogus);
        assert!(matches!(revoked.accept(&from_a_member, anyone), Err(RevocationError::NotEd25519(_))));
    }
    assert_eq!(revoked.len(), 0);
}

#[test]
fn records_need_a_member_signer_this_cluster_and_an_intact_signature() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let mut revoked = RevokedPeers::load(dir.path(), CLUSTER, &keypair);
    let stranger = Keypair::generate_ed25519();
    let outcome = revoked.accept(&record(&stranger, CLUSTER, valid_peer()), |_| false);
    assert!(matches!(outcome, Err(RevocationError::NotAMember(_))));
    let outcome = revoked.accept(&record(&stranger, "another", valid_peer()), anyone);
    assert!(matches!(outcome, Err(RevocationError::WrongCluster(_))));
    let mut tampered = record(&stranger, CLUSTER, valid_peer());
    let middle = tampered.len() / 2;
    tampered[middle] ^= 1;
    assert!(revoked.accept(&tampered, anyone).is_err());
    assert_eq!(revoked.len(), 0);
}

#[test]
fn a_flood_by_one_member_cannot_keep_a_real_revocation_from_spreading() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let mut first = RevokedPeers::load(&dir.path().join("first"), CLUSTER, &keypair);
    let hostile = Keypair::generate_ed25519();
    // Made-up ids are refused outright; valid ones fill the hostile member's quota, then stop.
    for n in 0..600 {
        assert!(first.accept(&record(&hostile, CLUSTER, made_up_peer(n)), anyone).is_err());
    }
    let mut refused = 0;
    for _ in 0..MAX_PER_SIGNER + 50 {
        match first.accept(&record(&hostile, CLUSTER, valid_peer()), anyone) {
            Ok(Some(_)) => {}
            Err(RevocationError::SignerFull(signer)) if signer == hostile.public().to_peer_id() => {
                refused += 1
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((first.len(), refused), (MAX_PER_SIGNER, 50));

    // A real revocation by another member is kept, and goes wherever the list goes: all of it.
    let admin = Keypair::generate_ed25519();
    let stolen_laptop = valid_peer();
    assert_eq!(first.accept(&record(&admin, CLUSTER, stolen_laptop), anyone), Ok(Some(stolen_laptop)));
    let mut late_joiner = RevokedPeers::load(&dir.path().join("late"), CLUSTER, &Keypair::generate_ed25519());
    for record in first.records() {
        late_joiner.accept(&record, anyone).unwrap();
    }
    assert!(late_joiner.contains(&stolen_laptop));
    assert_eq!(late_joiner.digest(), first.digest());
    assert_eq!(late_joiner.digest().count as usize, MAX_PER_SIGNER + 1);
}

#[test]
fn the_digest_names_the_set_whoever_signed_it() {
    let dir = tempfile::tempdir().unwrap();
    let peers = [valid_peer(), valid_peer()];
    let mut stores = Vec::new();
    for name in ["a", "b"] {
        let mut store = RevokedPeers::load(&dir.path().join(name), CLUSTER, &Keypair::generate_ed25519());
        let signer = Keypair::generate_ed25519();
        for peer in peers {
            store.accept(&record(&signer, CLUSTER, peer), anyone).unwrap();
        }
        stores.push(store);
    }
    assert_eq!(stores[0].digest(), stores[1].digest());
    assert_ne!(
        stores[0].digest(),
        RevokedPeers::load(&dir.path().join("c"), CLUSTER, &Keypair::generate_ed25519()).digest()
    );
}

#[test]
fn this_nodes_own_revocation_takes_over_anothers_record() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let mut revoked = RevokedPeers::load(dir.path(), CLUSTER, &keypair);
    let peer = valid_peer();
    revoked.accept(&record(&Keypair::generate_ed25519(), CLUSTER, peer), anyone).unwrap();
    assert_eq!(revoked.revoke(peer, &keypair), Ok(false), "already revoked");
    assert_eq!(revoked.peers[&peer].signer, keypair.public().to_peer_id());
    assert_eq!(revoked.revoke(peer, &keypair), Ok(false));
    assert_eq!(revoked.len(), 1);
}

#[test]
fn every_revocation_survives_a_restart_up_to_the_cap_and_the_rest_is_refused_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let mut revoked = RevokedPeers::load(dir.path(), CLUSTER, &keypair);
    let own = valid_peer();
    assert_eq!(revoked.revoke(own, &keypair), Ok(true));
    // Far past the old caps (512 announced, 4,096 kept): every signer at its quota.
    let mut kept = vec![own];
    while kept.len() < MAX_KEPT {
        let signer = Keypair::generate_ed25519();
        for _ in 0..MAX_PER_SIGNER.min(MAX_KEPT - kept.len()) {
            let peer = valid_peer();
            assert_eq!(revoked.accept(&record(&signer, CLUSTER, peer), anyone), Ok(Some(peer)));
            kept.push(peer);
        }
    }
    let one_more = valid_peer();
    let outcome = revoked.accept(&record(&Keypair::generate_ed25519(), CLUSTER, one_more), anyone);
    assert_eq!(outcome, Err(RevocationError::Full));
    assert!(!revoked.contains(&one_more), "what is refused is not enforced either");
    revoked.save_if_changed();

    let reloaded = RevokedPeers::load(dir.path(), CLUSTER, &keypair);
    assert_eq!(reloaded.len(), MAX_KEPT);
    assert!(kept.iter().all(|peer| reloaded.contains(peer)));
    assert_eq!(reloaded.digest(), revoked.digest());
    // Another cluster's list is not this one's.
    assert_eq!(RevokedPeers::load(dir.path(), "another", &keypair).len(), 0);
}

#[test]
fn a_list_of_plain_peer_ids_from_before_is_signed_anew_valid_ids_only() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let valid = valid_peer();
    let legacy = vec![made_up_peer(7).to_string(), valid.to_string(), "garbage".to_string()];
    std::fs::write(dir.path().join(REVOKED_FILE), serde_json::to_vec(&legacy).unwrap()).unwrap();
    let revoked = RevokedPeers::load(dir.path(), CLUSTER, &keypair);
    assert_eq!(revoked.iter().collect::<Vec<_>>(), vec![&valid]);
    let reloaded = RevokedPeers::load(dir.path(), CLUSTER, &keypair);
    assert!(reloaded.contains(&valid), "saved in the new form");
}
