use super::*;

const CLUSTER: &str = "0123456789abcdef";

struct Node {
    keypair: Keypair,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        Self { keypair: Keypair::generate_ed25519(), dir: tempfile::tempdir().unwrap() }
    }

    fn peer(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    fn roster(&self, admission_key: Option<[u8; 32]>) -> Roster {
        Roster::load(self.dir.path(), CLUSTER, &self.keypair, admission_key)
    }
}

fn with_records(records: impl Into<Vec<Vec<u8>>>) -> Credentials {
    Credentials { records: records.into(), founder_proof: None }
}

fn not_revoked(_: &PeerId) -> bool {
    false
}

const SECRET_KEY: [u8; 32] = [7; 32];

#[test]
fn founders_admit_each_other_by_proof_and_nobody_else() {
    let (a, b) = (Node::new(), Node::new());
    let mut first = a.roster(Some(SECRET_KEY));
    let second = b.roster(Some(SECRET_KEY));
    assert!(first.includes_this_node() && second.includes_this_node());
    assert!(!first.is_member(&b.peer()));

    let proof = second.founder_proof().unwrap();
    let stranger = PeerId::random();
    assert!(!first.admit_founder(stranger, &proof), "a proof is bound to its peer id");
    assert!(!first.admit_founder(b.peer(), &founder_proof(&[8; 32], &b.peer())), "another secret");
    assert!(first.admit_founder(b.peer(), &proof));
    assert!(first.is_member(&b.peer()));

    // A node without the secret cannot check proofs, so it admits no founder on its own.
    let mut invited = Node::new().roster(None);
    assert!(!invited.includes_this_node());
    assert!(!invited.admit_founder(b.peer(), &proof));
}

#[test]
fn an_invited_node_trusts_its_inviter_and_what_the_inviter_vouches_for() {
    let (founder, other_founder, joiner) = (Node::new(), Node::new(), Node::new());
    let mut inviter = founder.roster(Some(SECRET_KEY));
    let proof = other_founder.roster(Some(SECRET_KEY)).founder_proof().unwrap();
    assert!(inviter.admit_founder(other_founder.peer(), &proof));
    assert!(inviter.admit(joiner.peer()));

    let mut joined = joiner.roster(None);
    joined.adopt(founder.peer(), &with_records(inviter.records()), not_revoked).unwrap();
    for peer in [founder.peer(), other_founder.peer(), joiner.peer()] {
        assert!(joined.is_member(&peer), "{peer} should be a member");
    }
    // Its own record is the inviter's admission, which convinces nodes that trust the inviter.
    let mut third = Node::new().roster(None);
    third.adopt(other_founder.peer(), &with_records([]), not_revoked).unwrap();
    assert!(third.learn(&inviter.records(), not_revoked).is_empty(), "the inviter is unknown here");
    third.admit(founder.peer());
    assert!(third.learn(&joined.records()[..1], not_revoked) == vec![joiner.peer()]);
}

#[test]
fn records_chain_within_one_batch_but_not_from_strangers() {
    let (a, b, c, d) = (Node::new(), Node::new(), Node::new(), Node::new());
    let mut first = a.roster(Some(SECRET_KEY));
    first.admit(b.peer());
    let mut second = b.roster(None);
    second.adopt(a.peer(), &with_records(first.records()), not_revoked).unwrap();
    assert!(second.includes_this_node());
    assert!(second.admit(c.peer()));
    // A founder that knows only `a` learns of c through b's records, even with c's record before
    // the one that makes b a member.
    let mut other = d.roster(Some(SECRET_KEY));
    assert!(other.admit_founder(a.peer(), &first.founder_proof().unwrap()));
    let mut batch = second.records();
    batch.reverse();
    let mut learned = other.learn(&batch, not_revoked);
    learned.sort();
    let mut expected = vec![b.peer(), c.peer()];
    expected.sort();
    assert_eq!(learned, expected);
    // What was learned is written by the overlay's next save; a restart keeps it.
    other.save_if_changed();
    let reloaded = d.roster(None);
    assert!(reloaded.is_member(&b.peer()) && reloaded.is_member(&c.peer()));

    // A stranger's roster vouches for nobody here.
    let stranger = Node::new();
    let mut strange = stranger.roster(Some([9; 32]));
    let puppet = PeerId::random();
    strange.admit(puppet);
    assert!(other.learn(&strange.records(), not_revoked).is_empty());
    assert!(!other.is_member(&puppet) && !other.is_member(&stranger.peer()));
}

#[test]
fn tampered_foreign_and_revoked_records_are_refused() {
    let (a, b) = (Node::new(), Node::new());
    let mut first = a.roster(Some(SECRET_KEY));
    let mut second = b.roster(None);
    second.adopt(a.peer(), &with_records(first.records()), not_revoked).unwrap();
    let newcomer = PeerId::random();
    second.admit(newcomer);
    let record = second.members[&newcomer].clone();
    first.admit(b.peer());

    let mut tampered = record.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 1;
    assert!(first.learn(&[tampered], not_revoked).is_empty());
    let revoked = |peer: &PeerId| *peer == newcomer;
    assert!(first.learn(std::slice::from_ref(&record), revoked).is_empty());
    for garbage in [vec![], vec![0xff; 40], vec![1; MAX_ADMISSION_BYTES + 1]] {
        assert!(first.learn(&[garbage], not_revoked).is_empty());
    }
    let elsewhere = Roster::load(tempfile::tempdir().unwrap().path(), "another-cluster", &b.keypair, None);
    assert!(matches!(elsewhere.check(&record), Err(MemberError::WrongCluster(_))));

    assert_eq!(first.learn(&[record], not_revoked), vec![newcomer]);
    first.remove(&newcomer);
    assert!(!first.is_member(&newcomer));
}

#[test]
fn the_roster_survives_a_restart_and_stays_with_its_cluster() {
    let a = Node::new();
    let newcomer = PeerId::random();
    let mut roster = a.roster(Some(SECRET_KEY));
    roster.admit(newcomer);
    let reloaded = a.roster(None);
    assert!(reloaded.is_member(&newcomer) && reloaded.includes_this_node());
    let other_cluster = Roster::load(a.dir.path(), "another-cluster", &a.keypair, None);
    assert!(!other_cluster.is_member(&newcomer));
}

#[test]
fn probation_drops_non_members_after_the_grace_and_refuses_them_for_a_while() {
    let (member, stranger) = (PeerId::random(), PeerId::random());
    let start = Instant::now();
    let mut probation = Probation::default();
    probation.start(member, start);
    probation.start(stranger, start);
    let is_member = |peer: &PeerId| *peer == member;
    assert!(probation.expired(start + MEMBER_GRACE / 2, is_member).is_empty());
    // Reconnecting does not start the clock again.
    probation.end(&stranger);
    probation.start(stranger, start + MEMBER_GRACE / 2);
    let refused_at = start + MEMBER_GRACE;
    assert_eq!(probation.expired(refused_at, is_member), vec![stranger]);
    assert!(probation.recently_refused(&stranger, refused_at));
    assert!(!probation.recently_refused(&member, refused_at));

    // Refused, it may come back only long enough to redeem a key.
    probation.start(stranger, refused_at);
    assert!(probation.expired(refused_at + JOIN_WINDOW / 2, is_member).is_empty());
    assert_eq!(probation.expired(refused_at + JOIN_WINDOW, is_member), vec![stranger]);
    let later = refused_at + JOIN_WINDOW + REFUSAL_COOLDOWN;
    probation.expired(later, is_member);
    assert!(!probation.recently_refused(&stranger, later));
}

#[test]
fn an_announcement_held_on_probation_is_released_when_its_author_becomes_a_member() {
    let keypair = Keypair::generate_ed25519();
    let (peer, bystander) = (keypair.public().to_peer_id(), PeerId::random());
    let mut probation = Probation::default();
    let announcement = Announcement {
        version: super::super::ANNOUNCEMENT_VERSION,
        peer_id: peer.to_string(),
        name: "newcomer".into(),
        addresses: Vec::new(),
        models: Vec::new(),
        hardware: Default::default(),
        usage: Default::default(),
        load: Default::default(),
        software_version: "test".into(),
        started_at: 0,
        issued_at_ms: 0,
        revoked: Default::default(),
        members: Vec::new(),
        founder_proof: None,
        draining: false,
        infer_protocols: vec![crate::p2p::INFER_PROTOCOL.to_string()],
        api_keys: Default::default(),
        key_usage: Vec::new(),
    };
    // A joining node holds its inviter's announcement, with no clock running.
    probation.hold(bystander, announcement.clone());
    assert!(probation.release(|_| false).is_empty());
    let released = probation.release(|p| *p == bystander);
    assert_eq!(released, vec![(bystander, Some(announcement.clone()))]);
    let now = Instant::now();
    probation.start(peer, now);
    probation.hold(peer, announcement.clone());
    assert!(probation.release(|_| false).is_empty());
    let released = probation.release(|p| *p == peer);
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].1.as_ref(), Some(&announcement));
    assert!(probation.expired(now + MEMBER_GRACE, |_| false).is_empty(), "a member's clock stopped");
}

#[test]
fn a_member_does_not_take_a_stranger_as_its_inviter() {
    let (founder, stranger) = (Node::new(), Node::new());
    let mut member = founder.roster(Some(SECRET_KEY));
    // Someone who kept an old key signs one of their own, and a member's operator uses it.
    let rogue = stranger.roster(None);
    let refused = member.adopt(stranger.peer(), &with_records(rogue.records()), not_revoked);
    assert_eq!(refused, Err(MemberError::NotAMember(stranger.peer().to_string())));
    assert!(!member.is_member(&stranger.peer()));
    assert_eq!(member.records().len(), 1, "it vouches for nobody new");

    // A founder inviting a founder shows its proof with the roster.
    let other_founder = Node::new();
    let theirs = other_founder.roster(Some(SECRET_KEY));
    assert_eq!(member.adopt(other_founder.peer(), &theirs.credentials(), not_revoked), Ok(()));
    assert!(member.is_member(&other_founder.peer()));

    // An inviter that is a member is fine, and a revoked one never.
    let other = Node::new();
    member.admit(other.peer());
    assert_eq!(member.adopt(other.peer(), &with_records([]), not_revoked), Ok(()));
    let mut newcomer = Node::new().roster(None);
    let revoked = |peer: &PeerId| *peer == founder.peer();
    assert!(newcomer.adopt(founder.peer(), &with_records(member.records()), revoked).is_err());
}
