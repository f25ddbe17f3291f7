//! `--device cuda` is a promise: a GPU worker that cannot reach its GPUs must fail at start
//! (and show up as a crashing pod), not come up serving on the CPU.

use anyhow::bail;

/// Checks that this binary has CUDA support and that the `tp` GPUs the group needs open.
pub fn require_cuda(tp: usize) -> anyhow::Result<()> {
    if !cfg!(feature = "cuda") || !candle_core::utils::cuda_is_available() {
        bail!(
            "`--device cuda`: this dimple binary was built without CUDA support \
             (build with `--features cuda`, as deploy/Dockerfile.cuda does, or use `--device cpu`)"
        );
    }
    for ordinal in 0..tp {
        if let Err(e) = candle_core::Device::new_cuda(ordinal) {
            bail!(
                "`--device cuda`: cannot open GPU {ordinal} of the {tp} that `--tp {tp}` needs: {e} \
                 (check that the container is given {tp} GPU(s), e.g. the `nvidia.com/gpu` resource, \
                 and that the NVIDIA driver is visible in it)"
            );
        }
    }
    Ok(())
}
