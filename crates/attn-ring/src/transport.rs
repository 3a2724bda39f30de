//! How blocks travel round the ring.
//!
//! The algorithm ([`crate::cpu`]) speaks to its neighbours through [`Transport`] only: send a
//! message to the next rank, receive one from the previous. [`Channels`] is the transport of
//! ranks that are threads of one process; a transport over NCCL is the same two calls on
//! device buffers.

use std::sync::mpsc::{Receiver, Sender, channel};

use attn_core::{AttnError, Result};

/// One rank's link to its ring: it sends to rank `(r + 1) mod R` and receives from
/// `(r − 1) mod R`. Messages from one sender arrive in the order they were sent. `send` does
/// not wait for the receiver, so a rank can send its block and compute while it travels.
pub trait Transport<M> {
    /// This rank, `0 .. ranks()`.
    fn rank(&self) -> usize;
    /// Ranks in the ring.
    fn ranks(&self) -> usize;
    /// Sends `message` to the next rank.
    fn send(&mut self, message: M) -> Result<()>;
    /// The next message from the previous rank (waits for it).
    fn recv(&mut self) -> Result<M>;
}

/// A rank that is a thread: channels to its neighbours.
#[derive(Debug)]
pub struct Channels<M> {
    rank: usize,
    ranks: usize,
    next: Sender<M>,
    prev: Receiver<M>,
}

impl<M> Channels<M> {
    /// The links of a ring of `ranks` threads, rank r's at index r.
    pub fn ring(ranks: usize) -> Vec<Self> {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..ranks).map(|_| channel()).unzip();
        // rank r receives on channel r and sends on channel r + 1 (the next rank's)
        let mut senders: Vec<Option<Sender<M>>> = senders.into_iter().map(Some).collect();
        receivers
            .into_iter()
            .enumerate()
            .map(|(rank, prev)| {
                let next = senders[(rank + 1) % ranks].take().expect("each sender once");
                Self { rank, ranks, next, prev }
            })
            .collect()
    }
}

const HUNG_UP: &str = "a neighbour that left the ring";

/// What a rank gets when its neighbour has gone: that rank failed first, with its own error.
fn hung_up() -> AttnError {
    AttnError::Unsupported {
        stage: "ring",
        what: HUNG_UP,
        advice: "another rank failed first, and its error says why",
    }
}

/// Whether `e` only says that a neighbour left ([`Transport::recv`] after it failed).
pub fn is_hang_up(e: &AttnError) -> bool {
    matches!(e, AttnError::Unsupported { what, .. } if *what == HUNG_UP)
}

impl<M> Transport<M> for Channels<M> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn ranks(&self) -> usize {
        self.ranks
    }

    fn send(&mut self, message: M) -> Result<()> {
        self.next.send(message).map_err(|_| hung_up())
    }

    fn recv(&mut self) -> Result<M> {
        self.prev.recv().map_err(|_| hung_up())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_goes_round_the_ring_in_ranks_steps() {
        for ranks in 1..=5 {
            let links = Channels::<usize>::ring(ranks);
            let seen: Vec<Vec<usize>> = std::thread::scope(|s| {
                let handles: Vec<_> = links
                    .into_iter()
                    .map(|mut t| {
                        s.spawn(move || {
                            let mut held = t.rank();
                            let mut seen = vec![held];
                            for _ in 1..t.ranks() {
                                t.send(held).unwrap();
                                held = t.recv().unwrap();
                                seen.push(held);
                            }
                            seen
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (r, s) in seen.iter().enumerate() {
                // at step t rank r holds the block of rank r − t
                let want: Vec<usize> = (0..ranks).map(|t| (r + ranks - t) % ranks).collect();
                assert_eq!(s, &want, "ranks {ranks} rank {r}");
            }
        }
    }
}
