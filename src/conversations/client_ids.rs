//! The SQLite writer's memory of which `client_msg_id`s each conversation has stored: how a
//! re-send is recognised on SQLite without a unique index on `(conversation_id,
//! client_msg_id)`.
//!
//! That index cost the writer more than anything else it kept up to date, and more as the
//! table grew (the writer's CPU per message from 30 to 35 µs between 170,000 and a million
//! stored messages, against 24 µs flat without it): a client's ids land in the middle of
//! their conversation's part of it, not at its end as a new `seq` does, and an index on a
//! hash of the id costs the same (docs/benchmarks.md, "The `client_msg_id` index replaced by
//! the writer's memory"). On SQLite one writer thread appends every message of a tenant
//! (`storage::writer`), and only one runs per tenant at a time, so that thread can keep the
//! rule itself: it holds a 32-bit keyed hash of every id of the conversations it writes to,
//! loaded from the conversation's rows the first time it meets one. An id whose hash it does
//! not hold is surely new; a hash it holds is checked against the stored rows (a re-send, or
//! once in a few billion a collision).
//!
//! System messages are stored beside the writer, on the tenant's pool, so it does not hold
//! their ids; clients may not send ids of their shape (`log::SYSTEM_ID_PREFIX`), so no
//! client's id can be one of them.
//!
//! PostgreSQL keeps the unique index: several nodes may append to one conversation at once,
//! and only the database sees all of them.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use rusqlite::{Connection, params};

/// Most ids held over all conversations of one writer, about 16 MB (a held id takes some
/// 5 to 9 bytes in its set). Past it the conversations written to least recently are
/// forgotten until a quarter of the room is free; one that comes back is loaded again from
/// storage, a read of its rows. Real conversations are short, and a writer with nothing to
/// do for two minutes ends and frees it all, so the bound is for a tenant whose many long
/// conversations are all busy at once.
const MAX_HELD_IDS: usize = 1 << 21;

/// The reads this module does, on the writer's connection (inside its transaction).
pub(crate) const IDS_OF_CONVERSATION: &str =
    "SELECT client_msg_id FROM messages WHERE conversation_id = ?1";

/// What one writer knows of the ids stored per conversation.
pub struct ClientIds {
    /// Keyed afresh per writer, so that no client can choose ids whose hashes collide (each
    /// collision would cost a read of the conversation's rows).
    keys: RandomState,
    /// Per conversation met so far: the hashes of every id it has stored.
    conversations: HashMap<i64, Known>,
    /// Ids held over all of `conversations`, plus one per conversation for its entry (so
    /// that many conversations without ids count too), kept at most `limit`.
    held: usize,
    /// [`MAX_HELD_IDS`], or less in tests.
    limit: usize,
    /// Counts lookups (one per append); a conversation's last one orders what is forgotten
    /// first.
    clock: u64,
}

struct Known {
    hashes: HashSet<u32, BuildHasherDefault<Spread>>,
    /// The `clock` of this conversation's last lookup.
    used: u64,
}

impl Default for ClientIds {
    fn default() -> Self {
        Self::with_limit(MAX_HELD_IDS)
    }
}

impl ClientIds {
    fn with_limit(limit: usize) -> Self {
        Self {
            keys: RandomState::new(),
            conversations: HashMap::new(),
            held: 0,
            limit,
            clock: 0,
        }
    }

    /// Whether `client_msg_id` may already be stored in `conversation`: `false` means surely
    /// not, `true` that the stored rows must tell. Loads the conversation's ids the first
    /// time; `db` must be the writer's connection, inside its transaction.
    pub fn may_hold(
        &mut self,
        db: &Connection,
        conversation: i64,
        client_msg_id: &str,
    ) -> rusqlite::Result<bool> {
        self.clock += 1;
        let hash = self.hash(client_msg_id);
        if let Some(known) = self.conversations.get_mut(&conversation) {
            known.used = self.clock;
            return Ok(known.hashes.contains(&hash));
        }
        let mut hashes = HashSet::default();
        let mut rows = db.prepare_cached(IDS_OF_CONVERSATION)?;
        let mut rows = rows.query(params![conversation])?;
        while let Some(row) = rows.next()? {
            hashes.insert(self.hash(row.get_ref(0)?.as_str()?));
        }
        let held = hashes.contains(&hash);
        self.held += hashes.len() + 1;
        self.conversations.insert(
            conversation,
            Known {
                hashes,
                used: self.clock,
            },
        );
        self.make_room();
        Ok(held)
    }

    /// Records an id the writer has just stored in `conversation` (after [`Self::may_hold`]
    /// for it, in the same transaction).
    pub fn stored(&mut self, conversation: i64, client_msg_id: &str) {
        let hash = self.hash(client_msg_id);
        // Forgotten in between only if `may_hold` had to make room and chose this very
        // conversation, the one written to last: it is then loaded again next time.
        if let Some(known) = self.conversations.get_mut(&conversation)
            && known.hashes.insert(hash)
        {
            self.held += 1;
            self.make_room();
        }
    }

    /// Forgets everything: the transaction that stored what was recorded since rolled back.
    pub fn forget_all(&mut self) {
        self.conversations.clear();
        self.held = 0;
    }

    fn hash(&self, client_msg_id: &str) -> u32 {
        // The high half: SipHash's bits are all equally good, any half would do.
        (self.keys.hash_one(client_msg_id) >> 32) as u32
    }

    /// Forgets the conversations written to least recently until a quarter of the room is
    /// free, if the room is full. Sorting them all is rare: once per `limit / 4` new ids.
    fn make_room(&mut self) {
        if self.held <= self.limit {
            return;
        }
        let mut by_use: Vec<(u64, i64, usize)> = self
            .conversations
            .iter()
            .map(|(&id, k)| (k.used, id, k.hashes.len() + 1))
            .collect();
        by_use.sort_unstable();
        let target = self.limit - self.limit / 4;
        for (_, id, len) in by_use {
            if self.held <= target {
                break;
            }
            self.conversations.remove(&id);
            self.held -= len;
        }
    }
}

/// The hasher of the sets of hashes: their values are already SipHash output, so it only
/// spreads the 32 bits over the 64 the table reads (its top bits pick the probe tag, the low
/// ones the bucket).
#[derive(Default)]
struct Spread(u64);

impl Hasher for Spread {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u32`s are hashed here (`write_u32`); any other input still hashes correctly.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        // Fibonacci hashing: multiplying by 2^64 / φ carries the low bits into the high ones.
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection with the one table this module reads, holding `rows` as
    /// (conversation, client_msg_id).
    fn db(rows: &[(i64, &str)]) -> Connection {
        let db = Connection::open_in_memory().expect("memory");
        db.execute_batch("CREATE TABLE messages (conversation_id INTEGER, client_msg_id TEXT)")
            .expect("table");
        for (c, id) in rows {
            db.execute("INSERT INTO messages VALUES (?1, ?2)", params![c, id])
                .expect("row");
        }
        db
    }

    #[test]
    fn a_conversation_met_first_is_loaded_from_its_rows() {
        let db = db(&[(1, "a"), (1, "b"), (2, "c")]);
        let mut ids = ClientIds::default();
        assert!(ids.may_hold(&db, 1, "a").expect("read"));
        assert!(ids.may_hold(&db, 1, "b").expect("read"));
        assert!(
            !ids.may_hold(&db, 1, "c").expect("read"),
            "c is conversation 2's"
        );
        assert!(ids.may_hold(&db, 2, "c").expect("read"));
        assert_eq!(ids.held, 3 + 2, "three ids in two conversations");
    }

    #[test]
    fn a_stored_id_is_held_from_then_on() {
        let db = db(&[]);
        let mut ids = ClientIds::default();
        assert!(!ids.may_hold(&db, 1, "x").expect("read"));
        ids.stored(1, "x");
        assert!(ids.may_hold(&db, 1, "x").expect("read"));
        assert!(
            !ids.may_hold(&db, 2, "x").expect("read"),
            "ids are per conversation"
        );
    }

    #[test]
    fn a_rollback_forgets_and_storage_tells_again() {
        let db = db(&[(1, "kept")]);
        let mut ids = ClientIds::default();
        assert!(!ids.may_hold(&db, 1, "lost").expect("read"));
        ids.stored(1, "lost");
        ids.forget_all();
        assert_eq!(ids.held, 0);
        assert!(!ids.may_hold(&db, 1, "lost").expect("read"), "rolled back");
        assert!(ids.may_hold(&db, 1, "kept").expect("read"), "loaded again");
    }

    #[test]
    fn past_the_limit_the_least_recently_written_are_forgotten_and_reloaded() {
        let rows: Vec<(i64, String)> = (1..=4)
            .flat_map(|c| (0..4).map(move |n| (c, format!("{c}-{n}"))))
            .collect();
        let rows: Vec<(i64, &str)> = rows.iter().map(|(c, s)| (*c, s.as_str())).collect();
        let db = db(&rows);
        let mut ids = ClientIds::with_limit(12);
        for c in 1..=3 {
            ids.may_hold(&db, c, "new").expect("read");
        }
        // 3 × (4 + 1) = 15 held > 12: conversation 1, the least recent, went.
        assert!(ids.held <= 12, "held {}", ids.held);
        assert!(!ids.conversations.contains_key(&1));
        assert!(ids.conversations.contains_key(&3));
        // It comes back from storage with every id.
        assert!(ids.may_hold(&db, 1, "1-3").expect("read"));
        assert!(ids.held <= 12, "held {}", ids.held);
        assert!(ids.conversations.contains_key(&1));
    }

    #[test]
    fn hashes_spread_over_the_table() {
        // A set keyed by `Spread` must not pile up: many distinct hashes, all found again.
        let ids = ClientIds::default();
        let mut set: HashSet<u32, BuildHasherDefault<Spread>> = HashSet::default();
        for n in 0..100_000 {
            set.insert(ids.hash(&format!("p0-v{n}-1")));
        }
        assert!(set.len() > 99_990, "{} distinct", set.len());
        assert!((0..100_000).all(|n| set.contains(&ids.hash(&format!("p0-v{n}-1")))));
    }
}
