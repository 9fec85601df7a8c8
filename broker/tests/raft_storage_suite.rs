//! openraft's own storage test suite (`openraft::testing::log::Suite`) against the
//! Keel adapter: the real segment store, a real flusher thread, files in a temp dir.

use std::sync::Arc;

use keel_broker::replication::{PartitionLogStore, PartitionStateMachine, TypeConfig};
use keel_storage::{Flusher, Log, LogConfig};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

struct KeelStoreBuilder;

impl StoreBuilder<TypeConfig, PartitionLogStore, PartitionStateMachine, tempfile::TempDir> for KeelStoreBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, PartitionLogStore, PartitionStateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        // Small segments so the suite's logs span several files.
        let config = LogConfig { segment_bytes: 4096, ..LogConfig::default() };
        let log = Arc::new(Log::open(dir.path(), config).expect("open log"));
        let flusher = Arc::new(Flusher::spawn("test-flusher", 64).expect("spawn flusher"));
        let store = PartitionLogStore::new(log, flusher);
        let sm = PartitionStateMachine::open(keel_storage::disk::os(), dir.path().to_path_buf()).expect("open state machine");
        Ok((dir, store, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_against_the_segment_log() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(KeelStoreBuilder).await
}

/// What an unsynced file may hold after a power cut: empty, a header cut short, a body
/// whose checksum fails (an atomic file's frame, then a slot file's).
const TORN: [&[u8]; 5] = [
    b"",
    b"KMF1\x08\x00",
    b"KMF1\x04\x00\x00\x00\xde\xad\xbe\xef\x01\x02\x03\x04",
    b"KSL1\x01\x00\x00\x00\x00\x00\x00\x00\x04",
    b"KSL1\x01\x00\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00\xde\xad\xbe\xef\x01\x02\x03\x04",
];

/// Each hint's file, and the file of the same name it replaced (still read until the
/// hint is first written again).
const COMMITTED_FILES: [&str; 2] = ["raft.committed.slots", "raft.committed"];
const VOTE_COMMITTED_FILES: [&str; 2] = ["raft.vote.committed.slots", "raft.vote.committed"];

/// Leaves `bytes` as the durable content of a new file at `path` (a torn write as the
/// disk kept it).
fn leave_torn(disk: &keel_storage::disk::MemoryDisk, path: &std::path::Path, bytes: &[u8]) {
    use keel_storage::disk::{Disk, OpenMode};
    let f = disk.open(path, OpenMode::CreateNew).unwrap();
    f.write_all_at(0, &[bytes]).unwrap();
    f.sync_all().unwrap();
}

/// Regression (found by the keel-jepsen power-loss nemesis): the committed-index hint is
/// written without fsync, so a power cut can leave `raft.committed` empty or torn. Every
/// node then refused to open its groups ("corrupt data in raft.committed") and the whole
/// cluster stayed down. A lost hint must read as no hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_hint_torn_by_a_power_cut_reads_as_no_hint() {
    use keel_broker::replication::log_store::saved_committed;
    use keel_storage::disk::{Disk, MemoryDisk};
    use openraft::storage::RaftLogStorage;

    for (torn, file) in TORN.iter().flat_map(|t| COMMITTED_FILES.map(|f| (t, f))) {
        let disk = Arc::new(MemoryDisk::new());
        let dir = std::path::Path::new("/node/groups/7");
        disk.create_dir_all(dir).unwrap();
        leave_torn(&disk, &dir.join(file), torn);
        assert_eq!(saved_committed(&*disk, dir).expect("a torn hint is not an error"), None, "torn {file} {torn:?}");
        let mut store = store_on(&disk, dir);
        assert_eq!(store.read_committed().await.expect("a torn hint is not an error"), None, "torn {file} {torn:?}");
    }
}

/// Regression (found by `keel-jepsen`, seed 105): a clean stop records the committed
/// index durably, but a group whose commit had not moved since it opened (a restarted
/// node's idle metadata group) recorded "nothing committed" over the hint on disk; the
/// stopped node's `keel dump` then found no topics, and its next start applied nothing
/// until a leader spoke. A stop with nothing newer keeps the hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_with_no_new_commit_keeps_the_committed_hint() {
    use keel_broker::replication::log_store::saved_committed;
    use keel_broker::replication::types::RaftLogId;
    use keel_storage::disk::{Disk, MemoryDisk};
    use openraft::storage::RaftLogStorage;

    let disk = Arc::new(MemoryDisk::new());
    let dir = std::path::Path::new("/node/groups/0");
    disk.create_dir_all(dir).unwrap();
    let mut store = store_on(&disk, dir);
    store.save_committed(Some(RaftLogId::new_term_index(2, 6))).await.unwrap();
    drop(store);
    assert_eq!(saved_committed(&*disk, dir).unwrap(), Some(6), "a clean stop records the committed index");
    // Restarted, nothing new committed, stopped cleanly again.
    drop(store_on(&disk, dir));
    assert_eq!(saved_committed(&*disk, dir).unwrap(), Some(6), "the stop erased the committed hint");
    // And a later commit still replaces it.
    let mut store = store_on(&disk, dir);
    store.save_committed(Some(RaftLogId::new_term_index(3, 9))).await.unwrap();
    drop(store);
    assert_eq!(saved_committed(&*disk, dir).unwrap(), Some(9));
}

type Vote = openraft::impls::Vote<openraft::impls::leader_id_std::LeaderId<u64, u64>>;

/// A store on `disk` over the group directory `dir` (opened as a restarted node would).
fn store_on(disk: &Arc<keel_storage::disk::MemoryDisk>, dir: &std::path::Path) -> PartitionLogStore {
    let log = Arc::new(Log::open_on(disk.clone(), dir, LogConfig::default()).expect("open log"));
    let flusher = Arc::new(Flusher::spawn("test-flusher", 64).expect("spawn flusher"));
    PartitionLogStore::new(log, flusher)
}

/// A vote's term and candidate are fsynced whenever they change; that the vote became
/// committed is written without fsync (half of an election's vote fsyncs). A power cut
/// may take the committed flag, never the vote: it reads back uncommitted, for the same
/// leader. Without the power cut it reads back committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_votes_committed_flag_may_be_lost_in_a_power_cut_but_never_the_vote() {
    use keel_storage::disk::{Disk, MemoryDisk};
    use openraft::storage::RaftLogStorage;
    use openraft::RaftLogReader;

    let disk = Arc::new(MemoryDisk::new());
    let dir = std::path::Path::new("/node/groups/7");
    disk.create_dir_all(dir).unwrap();
    let mut store = store_on(&disk, dir);
    store.save_vote(&Vote::new(3, 2)).await.unwrap();
    store.save_vote(&Vote::new_committed(3, 2)).await.unwrap();
    assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new_committed(3, 2)), "read back before any crash: committed");
    drop(store);
    // A clean stop leaves it as it was.
    assert_eq!(store_on(&disk, dir).read_vote().await.unwrap(), Some(Vote::new_committed(3, 2)));

    disk.power_loss();
    let mut store = store_on(&disk, dir);
    assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(3, 2)), "after a power cut: the same vote, uncommitted");

    // A later term is durable at once, and the old committed flag does not apply to it.
    store.save_vote(&Vote::new_committed(3, 2)).await.unwrap();
    store.save_vote(&Vote::new(4, 1)).await.unwrap();
    drop(store);
    disk.power_loss();
    assert_eq!(store_on(&disk, dir).read_vote().await.unwrap(), Some(Vote::new(4, 1)), "the new term survives; term 3's committed flag names another leader");
}

/// A committed flag torn by a crash (written without fsync) reads as "not committed",
/// not as an error that would keep the group from opening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_vote_committed_flag_reads_as_an_uncommitted_vote() {
    use keel_storage::disk::{Disk, MemoryDisk};
    use openraft::storage::RaftLogStorage;
    use openraft::RaftLogReader;

    for (torn, file) in TORN.iter().flat_map(|t| VOTE_COMMITTED_FILES.map(|f| (t, f))) {
        let disk = Arc::new(MemoryDisk::new());
        let dir = std::path::Path::new("/node/groups/9");
        disk.create_dir_all(dir).unwrap();
        let mut store = store_on(&disk, dir);
        store.save_vote(&Vote::new(5, 3)).await.unwrap();
        drop(store);
        leave_torn(&disk, &dir.join(file), torn);
        assert_eq!(store_on(&disk, dir).read_vote().await.expect("a torn flag is not an error"), Some(Vote::new(5, 3)), "torn {file} {torn:?}");
    }
}

/// A group directory from before slot files holds its vote in `raft.vote`, an atomically
/// replaced file: that vote is read (a node must not forget whom it voted for across an
/// upgrade), the first vote saved afterwards goes to the slot file and wins from then on,
/// and a damaged vote is an error in either form, never taken for no vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_saved_before_slot_files_is_read_and_damage_is_never_taken_for_no_vote() {
    use keel_storage::disk::{Disk, MemoryDisk, OpenMode};
    use openraft::storage::RaftLogStorage;
    use openraft::RaftLogReader;

    let disk = Arc::new(MemoryDisk::new());
    let dir = std::path::Path::new("/node/groups/11");
    disk.create_dir_all(dir).unwrap();
    keel_storage::atomic_file::write(&*disk, dir, "raft.vote", &postcard::to_allocvec(&Vote::new_committed(6, 2)).unwrap()).unwrap();
    assert!(keel_broker::replication::log_store::has_vote(&*disk, dir));
    let mut store = store_on(&disk, dir);
    assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new_committed(6, 2)), "the legacy vote");
    store.save_vote(&Vote::new(7, 3)).await.unwrap();
    drop(store);
    disk.power_loss();
    assert_eq!(store_on(&disk, dir).read_vote().await.unwrap(), Some(Vote::new(7, 3)), "the slot file's vote, durable, over the legacy one");

    // Both slots damaged: an error, as a damaged legacy file is.
    let f = disk.open(&dir.join("raft.vote.slots"), OpenMode::ReadWrite).unwrap();
    f.write_all_at(0, &[&[0xee; 64]]).unwrap();
    f.write_all_at(keel_storage::slot_file::SLOT_STRIDE, &[&[0xee; 64]]).unwrap();
    assert!(store_on(&disk, dir).read_vote().await.is_err(), "a damaged vote is not no vote");
}
