//! [`NcclComm`]: the collectives through NCCL (cudarc's `nccl` module), one communicator per
//! rank thread, all in one process.
//!
//! The ranks of a group share an [`NcclGroup`]: the NCCL unique id every rank joins with,
//! and every rank's communicator, so that a failing rank can abort the whole group. An
//! aborted NCCL communicator ends its pending operations, which is what frees a peer that
//! is blocked in a collective waiting for the failed rank.
//!
//! Collectives run on the candle device's own stream, so they are ordered with the kernels
//! that produce and consume their tensors without extra synchronisation.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::{Comm as RawComm, Id, ReduceOp};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor,
};

use super::comm::{Comm, CommError};

/// A communicator that can move between threads.
struct Raw(RawComm);

// SAFETY: NCCL allows a communicator to be used from any thread provided calls on it are
// not concurrent. Every use goes through the `Mutex` that owns it in `NcclGroup::slots`.
unsafe impl Send for Raw {}

/// The shared state of one NCCL group (see the module docs).
pub struct NcclGroup {
    id: Id,
    world: usize,
    slots: Vec<Mutex<Option<Raw>>>,
    failure: Mutex<Option<String>>,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup")
            .field("world", &self.world)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held; recover the data if it ever happened.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NcclGroup {
    /// A new group of `world` ranks (creates the NCCL unique id).
    pub fn new(world: usize) -> Result<Arc<Self>, CommError> {
        let id = Id::new().map_err(|e| CommError::Backend {
            rank: 0,
            detail: format!("ncclGetUniqueId: {e:?}"),
        })?;
        Ok(Arc::new(Self {
            id,
            world,
            slots: (0..world).map(|_| Mutex::new(None)).collect(),
            failure: Mutex::new(None),
        }))
    }

    /// Joins as `rank` on `device` (a CUDA device). Blocks until every rank has joined, as
    /// NCCL initialisation is itself a collective: call it from each rank's own thread.
    pub fn join(self: &Arc<Self>, rank: usize, device: &Device) -> Result<NcclComm, CommError> {
        let backend = |detail: String| CommError::Backend { rank, detail };
        let cuda = device
            .as_cuda_device()
            .map_err(|e| backend(e.to_string()))?
            .clone();
        if rank >= self.world {
            return Err(backend(format!(
                "rank {rank} is outside a group of {}",
                self.world
            )));
        }
        let raw = RawComm::from_rank(cuda.cuda_stream(), rank, self.world, self.id)
            .map_err(|e| backend(format!("ncclCommInitRank: {e:?}")))?;
        *lock(&self.slots[rank]) = Some(Raw(raw));
        Ok(NcclComm {
            rank,
            device: cuda,
            group: self.clone(),
        })
    }

    /// Records the failure and aborts every communicator that is not in use right now (an
    /// in-use one belongs to a rank that is enqueueing; it finds the failure on its next
    /// call).
    fn abort(&self, reason: String) {
        {
            let mut f = lock(&self.failure);
            if f.is_none() {
                *f = Some(reason);
            }
        }
        for slot in &self.slots {
            if let Ok(mut s) = slot.try_lock() {
                // Dropping a cudarc communicator calls ncclCommAbort.
                s.take();
            }
        }
    }
}

/// One rank's NCCL communicator.
pub struct NcclComm {
    rank: usize,
    device: CudaDevice,
    group: Arc<NcclGroup>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.group.world)
            .finish()
    }
}

fn nccl_err(op: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::msg(format!("{op}: {e:?}"))
}

/// Sum over ranks of a contiguous CUDA tensor.
struct AllReduce<'a>(&'a RawComm);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce needs a CUDA tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::msg("all-reduce of a strided tensor"))?;
        let dev = s.device().clone();
        macro_rules! run {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(start..end);
                // SAFETY: the all-reduce writes every element of `dst` before it is read.
                let mut dst = unsafe { dev.alloc::<$t>(end - start)? };
                self.0
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(|e| nccl_err("ncclAllReduce", e))?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            dt => candle_core::bail!("the NCCL all-reduce does not take {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

/// Every rank's contiguous CUDA tensor, stacked along a new leading dimension.
struct AllGather<'a> {
    comm: &'a RawComm,
    world: usize,
}

impl CustomOp1 for AllGather<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-gather"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-gather needs a CUDA tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::msg("all-gather of a strided tensor"))?;
        let dev = s.device().clone();
        let n = (end - start) * self.world;
        macro_rules! run {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(start..end);
                // SAFETY: the all-gather writes every element of `dst` before it is read.
                let mut dst = unsafe { dev.alloc::<$t>(n)? };
                self.comm
                    .all_gather(&src, &mut dst)
                    .map_err(|e| nccl_err("ncclAllGather", e))?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            DType::U32 => run!(u32),
            dt => candle_core::bail!("the NCCL all-gather does not take {dt:?}"),
        };
        let mut dims = vec![self.world];
        dims.extend_from_slice(l.dims());
        Ok((out, Shape::from(dims)))
    }
}

impl NcclComm {
    fn fail(&self, detail: String) -> CommError {
        CommError::Backend {
            rank: self.rank,
            detail,
        }
    }

    /// Runs `f` with this rank's communicator, unless the group has failed.
    fn with_raw<T>(
        &self,
        f: impl FnOnce(&RawComm) -> candle_core::Result<T>,
    ) -> Result<T, CommError> {
        if let Some(reason) = lock(&self.group.failure).clone() {
            return Err(CommError::Aborted {
                rank: self.rank,
                reason,
            });
        }
        let slot = lock(&self.group.slots[self.rank]);
        match slot.as_ref() {
            Some(raw) => f(&raw.0).map_err(|e| self.fail(e.to_string())),
            None => Err(CommError::Aborted {
                rank: self.rank,
                reason: "the communicator was aborted".into(),
            }),
        }
    }

    fn on_device(&self, xs: &Tensor) -> Result<Tensor, CommError> {
        let dev = Device::Cuda(self.device.clone());
        xs.to_device(&dev)
            .and_then(|t| t.contiguous())
            .map_err(|e| self.fail(e.to_string()))
    }
}

impl Comm for NcclComm {
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
        let x = self.on_device(xs)?;
        self.with_raw(|raw| x.apply_op1_no_bwd(&AllReduce(raw)))
    }

    fn all_gather(&self, xs: &Tensor, dim: usize) -> Result<Tensor, CommError> {
        let world = self.group.world;
        if world == 1 {
            return Ok(xs.clone());
        }
        let x = self.on_device(xs)?;
        let dims = x.dims().to_vec();
        if dim >= dims.len() {
            return Err(CommError::Mismatch {
                rank: self.rank,
                detail: format!("all-gather along dim {dim} of a {dims:?} tensor"),
            });
        }
        let stacked = self.with_raw(|raw| x.apply_op1_no_bwd(&AllGather { comm: raw, world }))?;
        // [world, d0, .., dk] -> [d0, .., world, d_dim, ..] -> merge world into d_dim.
        let mut order: Vec<usize> = (1..=dim).collect();
        order.push(0);
        order.extend(dim + 1..=dims.len());
        let mut out_dims = dims.clone();
        out_dims[dim] *= world;
        stacked
            .permute(order)
            .and_then(|t| t.contiguous())
            .and_then(|t| t.reshape(out_dims))
            .map_err(|e| self.fail(e.to_string()))
    }

    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<f64>, CommError> {
        if self.group.world == 1 {
            return Ok(values.to_vec());
        }
        let dev = Device::Cuda(self.device.clone());
        let t =
            Tensor::from_slice(values, values.len(), &dev).map_err(|e| self.fail(e.to_string()))?;
        self.all_gather(&t, 0)?
            .to_vec1::<f64>()
            .map_err(|e| self.fail(e.to_string()))
    }

    fn abort(&self, reason: &str) {
        self.group.abort(format!("rank {}: {reason}", self.rank));
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.group
            .abort(format!("rank {} left the group", self.rank));
    }
}
