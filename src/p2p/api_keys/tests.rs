use super::*;

const CLUSTER: &str = "0123456789abcdef";
const NOW: u64 = 1_800_000_000;

fn anyone(_: &PeerId) -> bool {
    true
}

fn store(dir: &Path, keypair: &Keypair) -> ApiKeyRecords {
    ApiKeyRecords::load(dir, CLUSTER, keypair.public().to_peer_id())
}

fn spec(name: &str) -> KeySpec {
    KeySpec { name: name.into(), ..KeySpec::default() }
}

fn sealed(key: &KeyRecord, signer: &Keypair) -> Vec<u8> {
    signed::seal::<_, MAX_KEY_RECORD_BYTES>(key, signer).unwrap()
}

fn unverified(record: &[u8]) -> KeyRecord {
    signed::read_unverified::<_, MAX_KEY_RECORD_BYTES>(record).unwrap()
}

#[test]
fn a_secret_finds_its_key_and_nothing_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let mut keys = store(dir.path(), &keypair);
    let limited = KeySpec { models: vec!["smollm2".into()], requests_per_minute: Some(5), ..spec("intern") };
    let (secret, info) = keys.create(limited, &keypair).unwrap();
    assert!(secret.starts_with(SECRET_PREFIX) && secret.len() == SECRET_PREFIX.len() + 64);
    assert_eq!(info.signed_by, keypair.public().to_peer_id().to_string());
    let KeyLookup::Valid(grant) = keys.lookup(&secret, NOW) else { panic!("the secret was not found") };
    assert_eq!(grant.name, "intern");
    assert_eq!(grant.requests_per_minute, Some(5));
    assert!(grant.may_use("smollm2") && !grant.may_use("gemma"));
    assert_eq!(keys.lookup(&secret[..secret.len() - 1], NOW), KeyLookup::Unknown);
    assert_eq!(keys.lookup("", NOW), KeyLookup::Unknown);
    let (other, _) = keys.create(spec("app"), &keypair).unwrap();
    assert_ne!(other, secret);
    let KeyLookup::Valid(grant) = keys.lookup(&other, NOW) else { panic!() };
    assert!(grant.may_use("anything"), "a key with no models may use every model");
}

#[test]
fn nothing_the_store_keeps_or_lists_holds_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let mut keys = store(dir.path(), &keypair);
    let (secret, _) = keys.create(spec("intern"), &keypair).unwrap();
    let file = std::fs::read_to_string(dir.path().join(KEYS_FILE)).unwrap();
    let records: Vec<u8> = keys.records().concat();
    let listed = format!("{:?}", keys.list());
    let random_part = &secret[SECRET_PREFIX.len()..];
    assert!(!file.contains(random_part) && !listed.contains(random_part));
    assert!(!records.windows(random_part.len()).any(|window| window == random_part.as_bytes()));
}

#[test]
fn expired_keys_say_so_and_revoked_keys_are_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let mut keys = store(dir.path(), &keypair);
    let (secret, _) = keys.create(KeySpec { expires_at: Some(NOW), ..spec("short") }, &keypair).unwrap();
    assert!(matches!(keys.lookup(&secret, NOW - 1), KeyLookup::Valid(_)));
    assert_eq!(keys.lookup(&secret, NOW), KeyLookup::Expired("short".into()));
    assert_eq!(keys.revoke("short", &keypair), Ok(true));
    assert_eq!(keys.revoke("short", &keypair), Ok(false));
    assert_eq!(keys.lookup(&secret, NOW - 1), KeyLookup::Unknown);
    assert_eq!(keys.create(spec("short"), &keypair), Err(ApiKeyError::WasRevoked("short".into())));
    for bad in ["bad name", "..", ".hidden", "", "a/b", &"x".repeat(65)] {
        assert!(matches!(keys.create(spec(bad), &keypair), Err(ApiKeyError::InvalidName(_))), "{bad:?}");
    }
    let useless = KeySpec { requests_per_minute: Some(0), ..spec("useless") };
    assert!(matches!(keys.create(useless, &keypair), Err(ApiKeyError::OutOfBounds(_))));
    assert_eq!(keys.revoke("nobody", &keypair), Err(ApiKeyError::NotFound("nobody".into())));
    assert!(keys.list()[0].revoked_at.is_some());
}

#[test]
fn keys_survive_a_restart_and_stay_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let (live, gone) = {
        let mut keys = store(dir.path(), &keypair);
        let (live, _) = keys.create(spec("live"), &keypair).unwrap();
        let (gone, _) = keys.create(spec("gone"), &keypair).unwrap();
        keys.revoke("gone", &keypair).unwrap();
        (live, gone)
    };
    let keys = store(dir.path(), &keypair);
    assert!(matches!(keys.lookup(&live, NOW), KeyLookup::Valid(_)));
    assert_eq!(keys.lookup(&gone, NOW), KeyLookup::Unknown);
    let other_cluster = ApiKeyRecords::load(dir.path(), "another", keypair.public().to_peer_id());
    assert!(other_cluster.list().is_empty());
}

#[test]
fn records_spread_and_a_revocation_wins_whatever_the_order() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (node_a, node_b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let mut a = store(dir_a.path(), &node_a);
    let mut b = store(dir_b.path(), &node_b);
    let (secret, _) = a.create(spec("intern"), &node_a).unwrap();
    let created = a.records();
    assert_eq!(b.accept(&created[0], anyone), Ok(true));
    assert_eq!(b.accept(&created[0], anyone), Ok(false), "a record kept is not taken twice");
    assert!(matches!(b.lookup(&secret, NOW), KeyLookup::Valid(_)));
    assert_eq!(a.digest(), b.digest());

    b.revoke("intern", &node_b).unwrap();
    let revoked = b.records();
    assert_eq!(a.accept(&revoked[0], anyone), Ok(true));
    assert_eq!(a.lookup(&secret, NOW), KeyLookup::Unknown);
    // The live record arriving late (from a node that had not heard) changes nothing.
    assert_eq!(a.accept(&created[0], anyone), Ok(false));
    assert_eq!(a.lookup(&secret, NOW), KeyLookup::Unknown);
    assert_eq!(a.digest(), b.digest());
}

#[test]
fn one_name_made_on_two_nodes_at_once_resolves_alike_everywhere() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (node_a, node_b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let mut a = store(dir_a.path(), &node_a);
    let mut b = store(dir_b.path(), &node_b);
    let (secret_a, _) = a.create(spec("app"), &node_a).unwrap();
    let (secret_b, _) = b.create(spec("app"), &node_b).unwrap();
    let (from_a, from_b) = (a.records(), b.records());
    a.accept(&from_b[0], anyone).unwrap();
    b.accept(&from_a[0], anyone).unwrap();
    assert_eq!(a.digest(), b.digest());
    let works = |keys: &ApiKeyRecords, secret: &str| matches!(keys.lookup(secret, NOW), KeyLookup::Valid(_));
    assert_eq!(works(&a, &secret_a), works(&b, &secret_a));
    assert_eq!(works(&a, &secret_b), works(&b, &secret_b));
    assert!(works(&a, &secret_a) != works(&a, &secret_b), "exactly one of the two keys lives");
}

#[test]
fn records_need_a_member_signer_this_cluster_bounds_and_an_intact_signature() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let stranger = Keypair::generate_ed25519();
    let mut keys = store(dir.path(), &keypair);
    let mut other = store(tempfile::tempdir().unwrap().path(), &stranger);
    other.create(spec("intern"), &stranger).unwrap();
    let record = other.records().remove(0);
    let nobody = |_: &PeerId| false;
    assert!(matches!(keys.accept(&record, nobody), Err(ApiKeyError::NotAMember(_))));

    let key = unverified(&record);
    let foreign = sealed(&KeyRecord { cluster_id: "another".into(), ..key.clone() }, &stranger);
    assert!(matches!(keys.accept(&foreign, anyone), Err(ApiKeyError::WrongCluster(_))));
    let badly_named = sealed(&KeyRecord { name: "a\nb".into(), ..key.clone() }, &stranger);
    assert!(matches!(keys.accept(&badly_named, anyone), Err(ApiKeyError::InvalidName(_))));
    let many_models =
        KeyRecord { models: (0..=MAX_KEY_MODELS).map(|n| format!("m{n}")).collect(), ..key.clone() };
    assert!(matches!(
        keys.accept(&sealed(&many_models, &stranger), anyone),
        Err(ApiKeyError::OutOfBounds(_))
    ));
    let unprintable = KeyRecord { models: vec!["m\u{1b}[2J".into()], ..key.clone() };
    assert!(matches!(
        keys.accept(&sealed(&unprintable, &stranger), anyone),
        Err(ApiKeyError::OutOfBounds(_))
    ));

    let mut tampered = record.clone();
    let at = tampered.iter().position(|&byte| byte == b'i').unwrap();
    tampered[at] = b'j';
    assert!(matches!(
        keys.accept(&tampered, anyone),
        Err(ApiKeyError::Envelope(EnvelopeError::BadSignature))
    ));
    assert!(matches!(keys.accept(&[0u8; MAX_KEY_RECORD_BYTES + 1], anyone), Err(ApiKeyError::Envelope(_))));
    assert!(keys.list().is_empty());
}

#[test]
fn a_signer_fills_its_own_quota_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let flooder = Keypair::generate_ed25519();
    let mut keys = store(dir.path(), &keypair);
    let template = KeyRecord {
        cluster_id: CLUSTER.into(),
        name: String::new(),
        secret_hash: [7; 32],
        models: Vec::new(),
        requests_per_minute: None,
        tokens_per_minute: None,
        expires_at: None,
        created_at: NOW,
        revoked_at: None,
    };
    for n in 0..MAX_KEYS_PER_SIGNER {
        let record = sealed(&KeyRecord { name: format!("k{n}"), ..template.clone() }, &flooder);
        assert_eq!(keys.accept(&record, anyone), Ok(true));
    }
    let one_more = sealed(&KeyRecord { name: "over".into(), ..template.clone() }, &flooder);
    assert!(matches!(keys.accept(&one_more, anyone), Err(ApiKeyError::SignerFull(_))));
    assert!(keys.create(spec("mine"), &keypair).is_ok(), "the node's own quota is untouched");
}
