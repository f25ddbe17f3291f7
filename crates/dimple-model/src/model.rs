//! The whole Dimple model: text decoder, vision tower and image projector, loaded from a
//! checkpoint directory, with the image-row placement that joins them.
//!
//! Under tensor parallelism every rank builds its own `DimpleModel`: the text decoder is
//! sharded (see `crate::tp`), while the vision tower and the projector are **replicated**.
//! Dimple-7B's tower has about 0.6B parameters (1.3 GB in bf16), a small fraction of a
//! GPU's memory, and it runs once per image at admission, whereas the decoder runs over the
//! whole sequence at every diffusion step: 64 steps over a 1,300-token sequence cost about
//! 200 times the tower's FLOPs for one image. Sharding the tower would add two all-reduces
//! per block (64 per image) to save under 1% of the work; replicated, each rank computes
//! the same features at the same time with no communication.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::text::TextModel;
use crate::tp::{Comm, SingleComm};
use crate::vision::{ImageProjector, VisionModel};
use crate::{DimpleConfig, ModelError, Result, weights};

/// The model (or one tensor-parallel rank's shard of it).
pub struct DimpleModel {
    pub text: TextModel,
    vision: VisionModel,
    projector: ImageProjector,
    cfg: DimpleConfig,
}

impl DimpleModel {
    /// Loads `config.json` and the safetensors weights of a checkpoint directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = DimpleConfig::from_file(&dir.join("config.json"))?;
        let files = weights::checkpoint_files(dir)?;
        let vb = weights::var_builder(&files, dtype, device)?;
        Self::new(&cfg, &vb)
    }

    /// The built-in demo checkpoint (see `dimple_core::builtin`).
    pub fn builtin(dtype: DType, device: &Device) -> Result<Self> {
        let cfg = DimpleConfig::from_json(dimple_core::builtin::CONFIG_JSON)?;
        let vb = candle_nn::VarBuilder::from_slice_safetensors(
            dimple_core::builtin::MODEL_SAFETENSORS,
            dtype,
            device,
        )
        .map_err(|e| ModelError::Weights(e.to_string()))?;
        Self::new(&cfg, &vb)
    }

    /// Builds the model from a variable store rooted at the checkpoint's top level.
    pub fn new(cfg: &DimpleConfig, vb: &candle_nn::VarBuilder) -> Result<Self> {
        Self::new_sharded(cfg, vb, Arc::new(SingleComm))
    }

    /// Builds the shard of the rank of `comm` (the whole model for a group of one).
    pub fn new_sharded(
        cfg: &DimpleConfig,
        vb: &candle_nn::VarBuilder,
        comm: Arc<dyn Comm>,
    ) -> Result<Self> {
        cfg.validate()?;
        let text = TextModel::new_sharded(cfg, vb, comm)?;
        let vision = VisionModel::new(&cfg.vision_config, vb.pp("visual"))?;
        let projector = ImageProjector::new(
            cfg.vision_config.out_hidden_size,
            cfg.hidden_size,
            vb.pp("img_projector"),
        )?;
        Ok(Self {
            text,
            vision,
            projector,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &DimpleConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.text.device()
    }

    /// The tensor-parallel group this model is a shard of.
    pub fn comm(&self) -> &Arc<dyn Comm> {
        self.text.comm()
    }

    /// Image features in the text model's width, `[tokens, hidden]`, one row per image
    /// token, images in order. `pixel_values` holds every image's patch rows in order.
    pub fn encode_images(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let pv = pixel_values.to_dtype(self.text.dtype())?;
        self.projector.forward(&self.vision.forward(&pv, grids)?)
    }

    /// Input embeddings of `ids` with image feature rows placed, in order, at the image-token
    /// positions. The number of image tokens must equal the number of feature rows.
    pub fn embed(&self, ids: &[u32], image_features: Option<&Tensor>) -> Result<Tensor> {
        let tokens = self.text.embed_tokens(ids)?;
        let slots: Vec<usize> = (0..ids.len())
            .filter(|&i| ids[i] == self.cfg.image_token_id)
            .collect();
        let rows = match image_features {
            Some(f) => f.dims2()?.0,
            None => 0,
        };
        if slots.len() != rows {
            return Err(ModelError::Input(format!(
                "the prompt has {} image tokens but the images give {rows} feature rows",
                slots.len()
            )));
        }
        let Some(features) = image_features else {
            return Ok(tokens);
        };
        // Gather from [token embeddings; image rows]: position i reads its own row, or the
        // next image row when it is an image token.
        let n = ids.len() as u32;
        let mut index: Vec<u32> = (0..n).collect();
        for (k, &s) in slots.iter().enumerate() {
            index[s] = n + k as u32;
        }
        let both = Tensor::cat(&[&tokens, &features.to_dtype(tokens.dtype())?], 0)?;
        let idx = Tensor::from_vec(index, ids.len(), tokens.device())?;
        Ok(both.index_select(&idx, 0)?)
    }
}

/// Where every rank of a group loads its shard from.
#[derive(Debug, Clone)]
pub enum Checkpoint {
    /// A checkpoint directory: `config.json` and safetensors (single or sharded files).
    Dir(PathBuf),
    /// The built-in demo model (see `dimple_core::builtin`).
    Builtin,
    /// Deterministic pseudo-random weights for this configuration: benchmarks of a model
    /// shape whose weights are not at hand (norm weights are 1, everything else is small).
    Random(Box<DimpleConfig>),
}

impl Checkpoint {
    /// The model's configuration, read without loading any weight.
    pub fn config(&self) -> Result<DimpleConfig> {
        match self {
            Checkpoint::Dir(dir) => DimpleConfig::from_file(&dir.join("config.json")),
            Checkpoint::Builtin => DimpleConfig::from_json(dimple_core::builtin::CONFIG_JSON),
            Checkpoint::Random(cfg) => {
                cfg.validate()?;
                Ok((**cfg).clone())
            }
        }
    }

    /// Loads the shard of the rank of `comm` onto `device`.
    pub fn load(&self, dtype: DType, device: &Device, comm: Arc<dyn Comm>) -> Result<DimpleModel> {
        let cfg = self.config()?;
        let vb = match self {
            Checkpoint::Dir(dir) => {
                weights::var_builder(&weights::checkpoint_files(dir)?, dtype, device)?
            }
            Checkpoint::Builtin => VarBuilder::from_slice_safetensors(
                dimple_core::builtin::MODEL_SAFETENSORS,
                dtype,
                device,
            )
            .map_err(|e| ModelError::Weights(e.to_string()))?,
            Checkpoint::Random(_) => {
                VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
            }
        };
        DimpleModel::new_sharded(&cfg, &vb, comm)
    }
}

/// Weights computed on the device from the tensor's name: `0.02 * sin(a * i + phase(name))`
/// for element i, and ones for 1-D `weight`s (every one of them is a norm). Cheap to make
/// on a GPU, identical on every rank, so shards of one tensor fit together.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if s.rank() == 1 && name.ends_with("weight") {
            return Tensor::ones(s, dtype, dev);
        }
        // FNV-1a of the name: a different phase for every tensor.
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let phase = (hash % 6283) as f64 / 1000.0;
        let n = s.elem_count();
        let i = Tensor::arange(0u32, n as u32, dev)?.to_dtype(DType::F32)?;
        let w = i.affine(0.618_034, phase)?.sin()?.affine(0.02, 0.0)?;
        w.reshape(s)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape; `{name}` was asked for without one")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Records the name and shape of every tensor a model build asks for, answering with the
/// pseudo-random weights.
#[derive(Default, Clone)]
struct RecordingWeights(Arc<std::sync::Mutex<Vec<TensorEntry>>>);

/// A tensor's name and shape.
type TensorEntry = (String, Vec<usize>);

impl SimpleBackend for RecordingWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut seen) = self.0.lock() {
            seen.push((name.to_owned(), s.dims().to_vec()));
        }
        RandomWeights.get(s, name, init, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        RandomWeights.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Writes the weights [`Checkpoint::Random`] loads for `cfg` as one safetensors file in
/// `dtype` (f32, bf16 or f16): the tensors a model of that configuration reads, each
/// computed and written in turn. Finding the names builds the model once on the CPU in f16
/// (half its f32 memory, for a moment); the file is written to a sibling and renamed into
/// place.
pub fn save_random_weights(cfg: &DimpleConfig, dtype: DType, path: &Path) -> Result<()> {
    use std::io::Write;

    let tag = match dtype {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        other => {
            return Err(ModelError::Config(format!(
                "random weights are written as f32, bf16 or f16, not {other:?}"
            )));
        }
    };
    let recorder = RecordingWeights::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F16, Device::Cpu);
    drop(DimpleModel::new(cfg, &vb)?);
    let mut tensors = recorder
        .0
        .lock()
        .map_err(|_| ModelError::Weights("the weight recorder was poisoned".into()))?
        .clone();
    tensors.sort();
    tensors.dedup_by(|a, b| a.0 == b.0);

    let elem = dtype.size_in_bytes();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dims) in &tensors {
        let bytes = dims.iter().product::<usize>() * elem;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": tag, "shape": dims, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header).map_err(|e| ModelError::Io(e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let io = |e: std::io::Error| ModelError::Io(format!("writing {}: {e}", path.display()));
    let partial = path.with_extension("safetensors.partial");
    let file = std::fs::File::create(&partial).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&header).map_err(io)?;
    for (name, dims) in &tensors {
        let t = RandomWeights.get(
            Shape::from_dims(dims),
            name,
            candle_nn::Init::Const(0.),
            dtype,
            &Device::Cpu,
        )?;
        let flat = t.flatten_all()?;
        match dtype {
            DType::F32 => {
                for v in flat.to_vec1::<f32>()? {
                    out.write_all(&v.to_le_bytes()).map_err(io)?;
                }
            }
            DType::BF16 => {
                for v in flat.to_vec1::<half::bf16>()? {
                    out.write_all(&v.to_le_bytes()).map_err(io)?;
                }
            }
            _ => {
                for v in flat.to_vec1::<half::f16>()? {
                    out.write_all(&v.to_le_bytes()).map_err(io)?;
                }
            }
        }
    }
    out.flush().map_err(io)?;
    drop(out);
    std::fs::rename(&partial, path).map_err(io)
}
