//! [`LocalComm`]: the ranks are threads of one process and exchange through shared memory.
//!
//! Every collective is one rendezvous: each rank deposits its contribution in its own slot;
//! the last to arrive publishes the complete set and wakes the others; every rank then
//! combines the set itself, always in rank order 0..N, so the result is the same on every
//! rank and from run to run. A rank that fails calls [`Comm::abort`] (or simply drops its
//! handle, as a panicking thread does), which wakes every waiting peer with an error; a
//! timeout is the last resort against a peer that neither arrives nor fails.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::comm::{Comm, CommError};

/// What one rank contributes to a collective.
#[derive(Debug, Clone)]
enum Payload {
    Tensor(Tensor),
    Host(Vec<f64>),
}

#[derive(Debug)]
struct State {
    /// Completed rendezvous so far; a waiter knows its round is done when this moves.
    generation: u64,
    arrived: usize,
    /// The collective of the current round, so that ranks calling different ones are
    /// caught instead of combining unrelated data.
    op: &'static str,
    slots: Vec<Option<Payload>>,
    /// The complete set of the last finished round. A rank can only start the next round
    /// after reading it, so it is never overwritten under a reader.
    result: Option<Arc<Vec<Payload>>>,
    poisoned: Option<String>,
}

#[derive(Debug)]
struct Group {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
    timeout: Duration,
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; recover the data if it ever happened.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn poison(&self, reason: String) {
        let mut st = self.lock();
        if st.poisoned.is_none() {
            st.poisoned = Some(reason);
        }
        drop(st);
        self.cv.notify_all();
    }
}

/// One rank's handle on a thread group. Dropping it aborts the group (a rank that leaves
/// can never take part in a collective again).
#[derive(Debug)]
pub struct LocalComm {
    rank: usize,
    group: Arc<Group>,
}

impl LocalComm {
    /// Handles for ranks `0..world`, in order. A collective that waits longer than
    /// `timeout` for its peers aborts the group.
    pub fn group(world: usize, timeout: Duration) -> Vec<LocalComm> {
        let world = world.max(1);
        let group = Arc::new(Group {
            world,
            state: Mutex::new(State {
                generation: 0,
                arrived: 0,
                op: "",
                slots: vec![None; world],
                result: None,
                poisoned: None,
            }),
            cv: Condvar::new(),
            timeout,
        });
        (0..world)
            .map(|rank| LocalComm {
                rank,
                group: group.clone(),
            })
            .collect()
    }

    fn aborted(&self, reason: &str) -> CommError {
        CommError::Aborted {
            rank: self.rank,
            reason: reason.to_string(),
        }
    }

    /// The rendezvous: returns every rank's payload, in rank order.
    fn exchange(&self, op: &'static str, payload: Payload) -> Result<Arc<Vec<Payload>>, CommError> {
        let g = &self.group;
        let mut st = g.lock();
        if let Some(r) = &st.poisoned {
            return Err(self.aborted(r));
        }
        if st.arrived == 0 {
            st.op = op;
        } else if st.op != op {
            let detail = format!("called `{op}` while its peers are in `{}`", st.op);
            drop(st);
            g.poison(format!("rank {}: {detail}", self.rank));
            return Err(CommError::Mismatch {
                rank: self.rank,
                detail,
            });
        }
        st.slots[self.rank] = Some(payload);
        st.arrived += 1;
        if st.arrived == g.world {
            let all: Option<Vec<Payload>> = st.slots.iter_mut().map(Option::take).collect();
            let Some(all) = all else {
                // Each rank fills only its own slot and `arrived` counts distinct ranks.
                return Err(CommError::Mismatch {
                    rank: self.rank,
                    detail: format!("`{op}`: a rank slot was empty"),
                });
            };
            let all = Arc::new(all);
            st.result = Some(all.clone());
            st.arrived = 0;
            st.generation += 1;
            drop(st);
            g.cv.notify_all();
            return Ok(all);
        }
        let round = st.generation;
        let deadline = Instant::now() + g.timeout;
        loop {
            if st.generation != round {
                return st
                    .result
                    .clone()
                    .ok_or_else(|| self.aborted("a finished round has no result"));
            }
            if let Some(r) = &st.poisoned {
                return Err(self.aborted(r));
            }
            let now = Instant::now();
            if now >= deadline {
                let seconds = g.timeout.as_secs();
                st.poisoned = Some(format!(
                    "rank {} timed out in `{op}` after {seconds} s",
                    self.rank
                ));
                drop(st);
                g.cv.notify_all();
                return Err(CommError::Timeout {
                    rank: self.rank,
                    op,
                    seconds,
                });
            }
            st =
                g.cv.wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
        }
    }

    fn tensors(&self, all: &[Payload], like: &Tensor) -> Result<Vec<Tensor>, CommError> {
        all.iter()
            .enumerate()
            .map(|(r, p)| match p {
                Payload::Tensor(t) if t.dims() == like.dims() && t.dtype() == like.dtype() => {
                    t.to_device(like.device()).map_err(|e| self.backend(e))
                }
                Payload::Tensor(t) => Err(CommError::Mismatch {
                    rank: self.rank,
                    detail: format!(
                        "rank {r} sent a {:?} {:?} tensor, this rank a {:?} {:?} one",
                        t.dims(),
                        t.dtype(),
                        like.dims(),
                        like.dtype()
                    ),
                }),
                Payload::Host(_) => Err(CommError::Mismatch {
                    rank: self.rank,
                    detail: format!("rank {r} sent host values, not a tensor"),
                }),
            })
            .collect()
    }

    fn backend(&self, e: candle_core::Error) -> CommError {
        CommError::Backend {
            rank: self.rank,
            detail: e.to_string(),
        }
    }
}

impl Comm for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, xs: &Tensor) -> Result<Tensor, CommError> {
        if self.group.world == 1 {
            return Ok(xs.clone());
        }
        let all = self.exchange("all_reduce_sum", Payload::Tensor(xs.clone()))?;
        let parts = self.tensors(&all, xs)?;
        // Fixed order: ((x0 + x1) + x2) + ..., identical on every rank.
        let mut acc = parts[0].clone();
        for p in &parts[1..] {
            acc = (acc + p).map_err(|e| self.backend(e))?;
        }
        Ok(acc)
    }

    fn all_gather(&self, xs: &Tensor, dim: usize) -> Result<Tensor, CommError> {
        if self.group.world == 1 {
            return Ok(xs.clone());
        }
        let all = self.exchange("all_gather", Payload::Tensor(xs.clone()))?;
        let parts = self.tensors(&all, xs)?;
        Tensor::cat(&parts, dim).map_err(|e| self.backend(e))
    }

    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<f64>, CommError> {
        if self.group.world == 1 {
            return Ok(values.to_vec());
        }
        let all = self.exchange("all_gather_host", Payload::Host(values.to_vec()))?;
        let mut out = Vec::with_capacity(values.len() * all.len());
        for (r, p) in all.iter().enumerate() {
            match p {
                Payload::Host(v) if v.len() == values.len() => out.extend_from_slice(v),
                _ => {
                    return Err(CommError::Mismatch {
                        rank: self.rank,
                        detail: format!(
                            "rank {r} sent a different host payload than this rank's {} values",
                            values.len()
                        ),
                    });
                }
            }
        }
        Ok(out)
    }

    fn abort(&self, reason: &str) {
        self.group.poison(format!("rank {}: {reason}", self.rank));
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        // A rank that is gone can never arrive again: wake anyone waiting for it. After a
        // clean shutdown nobody waits, and the poisoned group is simply never used again.
        self.group
            .poison(format!("rank {} left the group", self.rank));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn run<T: Send + 'static>(
        world: usize,
        f: impl Fn(LocalComm) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = LocalComm::group(world, Duration::from_secs(10))
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank() {
        let out = run(3, |c| {
            let r = c.rank() as f32;
            // Rank r holds [r+1, 10(r+1)]; the sum is [6, 60].
            let x = Tensor::new(&[r + 1.0, 10.0 * (r + 1.0)], &Device::Cpu).unwrap();
            let mut results = Vec::new();
            for _ in 0..50 {
                results.push(c.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap());
            }
            results
        });
        for per_rank in out {
            for v in per_rank {
                assert_eq!(v, vec![6.0, 60.0]);
            }
        }
    }

    #[test]
    fn all_gather_concatenates_along_the_dim_in_rank_order() {
        let out = run(2, |c| {
            let r = c.rank() as f32;
            let x = Tensor::new(&[[r, r], [r + 10.0, r + 10.0]], &Device::Cpu).unwrap();
            let g1 = c.all_gather(&x, 1).unwrap().to_vec2::<f32>().unwrap();
            let g0 = c.all_gather(&x, 0).unwrap().dims().to_vec();
            let h = c.all_gather_host(&[r, -r].map(f64::from)).unwrap();
            (g1, g0, h)
        });
        for (g1, g0, h) in out {
            assert_eq!(
                g1,
                vec![vec![0.0, 0.0, 1.0, 1.0], vec![10.0, 10.0, 11.0, 11.0]]
            );
            assert_eq!(g0, vec![4, 2]);
            assert_eq!(h, vec![0.0, -0.0, 1.0, -1.0]);
        }
    }

    #[test]
    fn a_rank_that_aborts_or_leaves_wakes_its_peers() {
        let out = run(3, |c| {
            let x = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
            c.all_reduce_sum(&x).unwrap();
            if c.rank() == 1 {
                c.abort("injected");
                return None;
            }
            if c.rank() == 2 {
                drop(c);
                return None;
            }
            let started = Instant::now();
            let err = c.all_reduce_sum(&x).unwrap_err();
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "woken, not timed out"
            );
            Some(err)
        });
        let err = out[0].clone().unwrap();
        assert!(matches!(err, CommError::Aborted { rank: 0, .. }), "{err}");
    }

    #[test]
    fn a_peer_that_never_arrives_times_out() {
        let mut comms = LocalComm::group(2, Duration::from_millis(50));
        let keep = comms.pop();
        let c = comms.pop().unwrap();
        let err = c.all_gather_host(&[1.0]).unwrap_err();
        assert!(
            matches!(
                err,
                CommError::Timeout {
                    rank: 0,
                    op: "all_gather_host",
                    ..
                }
            ),
            "{err}"
        );
        // The group stays failed.
        drop(keep);
        assert!(matches!(
            c.all_gather_host(&[1.0]),
            Err(CommError::Aborted { .. })
        ));
    }

    #[test]
    fn different_collectives_are_caught() {
        let out = run(2, |c| {
            let x = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
            if c.rank() == 0 {
                c.all_reduce_sum(&x).map(|_| ())
            } else {
                c.all_gather_host(&[0.0]).map(|_| ())
            }
        });
        assert!(out.iter().all(|r| r.is_err()), "{out:?}");
    }
}
