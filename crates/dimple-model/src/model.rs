//! The whole Dimple model: text decoder, vision tower and image projector, loaded from a
//! checkpoint directory, with the image-row placement that joins them.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::text::TextModel;
use crate::vision::{ImageProjector, VisionModel};
use crate::{DimpleConfig, ModelError, Result, weights};

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
        let vb = candle_nn::VarBuilder::from_slice_safetensors(dimple_core::builtin::MODEL_SAFETENSORS, dtype, device)
            .map_err(|e| ModelError::Weights(e.to_string()))?;
        Self::new(&cfg, &vb)
    }

    /// Builds the model from a variable store rooted at the checkpoint's top level.
    pub fn new(cfg: &DimpleConfig, vb: &candle_nn::VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let text = TextModel::new(cfg, vb)?;
        let vision = VisionModel::new(&cfg.vision_config, vb.pp("visual"))?;
        let projector = ImageProjector::new(cfg.vision_config.out_hidden_size, cfg.hidden_size, vb.pp("img_projector"))?;
        Ok(Self { text, vision, projector, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &DimpleConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.text.device()
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
        let slots: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == self.cfg.image_token_id).collect();
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
        let Some(features) = image_features else { return Ok(tokens) };
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
