//! Why a process could not join or use its group.

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("distributed launch: {0}")]
    Env(String),
    #[error(
        "rank {rank} of {world}: could not join the process group at {addr}:{port} within \
         {timeout_s} s ({message}); is every rank started, and MASTER_ADDR/MASTER_PORT the same \
         for all?"
    )]
    Join {
        rank: usize,
        world: usize,
        addr: String,
        port: u16,
        timeout_s: u64,
        message: String,
    },
    #[error("rank {rank}: {what} failed: {message} (a peer stopped or timed out)")]
    Collective {
        rank: usize,
        what: &'static str,
        message: String,
    },
    #[error("the process group was already created")]
    AlreadyInitialized,
    #[error(
        "rank {rank}: the ranks were started with different settings ({differing}): start \
         every rank with the same command line"
    )]
    Mismatch { rank: usize, differing: String },
}
