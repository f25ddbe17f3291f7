//! Prompt building: chat template rendering, tokenisation and image-token expansion.
//!
//! A [`PromptBuilder`] owns a Hugging Face tokenizer and a compiled chat template. It turns a
//! conversation into the token ids the model sees, the way the reference `DimpleProcessor`
//! does: render the template to text, tokenise it without adding special tokens (the special
//! tokens written by the template become their single ids), then repeat each
//! `<|image_pad|>` id as many times as its image has merged patches. Images are only
//! placeholders here; the caller measures them and passes their token counts in order.
//!
//! Text inside messages is tokenised as written, so a literal `<|im_end|>` typed by a user
//! becomes the special id, exactly as in the reference processor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value, context};
use tokenizers::Tokenizer;

/// The Qwen2-VL / Qwen2.5-VL chat template that Dimple uses, used when a model folder ships
/// none of its own.
pub const QWEN2_VL_CHAT_TEMPLATE: &str = concat!(
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}",
    "{% for message in messages %}",
    "{% if loop.first and message['role'] != 'system' %}",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "<|im_start|>{{ message['role'] }}\n",
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n",
    "{% else %}{% for content in message['content'] %}",
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}",
    "{% set image_count.value = image_count.value + 1 %}",
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "{% elif content['type'] == 'video' or 'video' in content %}",
    "{% set video_count.value = video_count.value + 1 %}",
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}",
    "<|vision_start|><|video_pad|><|vision_end|>",
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}",
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
);

/// Name under which the chat template is stored in the template environment.
const TEMPLATE_NAME: &str = "chat_template";

/// The special tokens the builder resolves by their text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpecialToken {
    ImStart,
    ImEnd,
    EndOfText,
    VisionStart,
    VisionEnd,
    ImagePad,
    Mask,
}

impl SpecialToken {
    pub const ALL: [SpecialToken; 7] = [
        SpecialToken::ImStart,
        SpecialToken::ImEnd,
        SpecialToken::EndOfText,
        SpecialToken::VisionStart,
        SpecialToken::VisionEnd,
        SpecialToken::ImagePad,
        SpecialToken::Mask,
    ];

    /// The token's text in the vocabulary.
    pub fn as_str(self) -> &'static str {
        match self {
            SpecialToken::ImStart => "<|im_start|>",
            SpecialToken::ImEnd => "<|im_end|>",
            SpecialToken::EndOfText => "<|endoftext|>",
            SpecialToken::VisionStart => "<|vision_start|>",
            SpecialToken::VisionEnd => "<|vision_end|>",
            SpecialToken::ImagePad => "<|image_pad|>",
            SpecialToken::Mask => "<|mask|>",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Everything that can go wrong while loading a tokenizer or building a prompt.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot load tokenizer from `{path}`: {source}")]
    LoadTokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("cannot read `{path}`: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse `{path}` as JSON: {source}")]
    ParseJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("`chat_template` in `{path}` {reason}")]
    BadChatTemplateField { path: PathBuf, reason: String },
    #[error("chat template does not compile: {source}")]
    CompileTemplate {
        #[source]
        source: minijinja::Error,
    },
    #[error("chat template failed to render: {source}")]
    RenderTemplate {
        #[source]
        source: minijinja::Error,
    },
    #[error("tokenizer has no `{token}` token, which this prompt needs")]
    MissingSpecialToken { token: &'static str },
    #[error("`messages` must not be empty")]
    EmptyConversation,
    #[error(
        "prompt has {placeholders} `<|image_pad|>` placeholder(s) but {counts} image token count(s) were given"
    )]
    ImageCountMismatch { placeholders: usize, counts: usize },
    #[error("`image_token_counts[{index}]` must be at least 1, got 0")]
    EmptyImage { index: usize },
    #[error("prompt has {tokens} tokens, more than `max_prompt_tokens` = {max_prompt_tokens}")]
    PromptTooLong {
        tokens: usize,
        max_prompt_tokens: usize,
    },
    #[error("cannot tokenize text: {source}")]
    Tokenize {
        #[source]
        source: tokenizers::Error,
    },
    #[error("token id {id} is not in the vocabulary (size {vocab_size})")]
    UnknownTokenId { id: u32, vocab_size: usize },
    #[error("cannot decode ids: {source}")]
    Decode {
        #[source]
        source: tokenizers::Error,
    },
}

pub type Result<T> = std::result::Result<T, PromptError>;

/// Each token's byte range `(start, end)` in the text it came from.
pub type ByteSpans = Vec<(usize, usize)>;

/// One piece of a multimodal message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContentPart {
    Text(String),
    /// An image; its token count is supplied separately to [`PromptBuilder::build`].
    Image,
}

impl ContentPart {
    pub fn text(text: impl Into<String>) -> Self {
        ContentPart::Text(text.into())
    }
}

/// A message body: plain text, or a sequence of text and image parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One turn of the conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`; passed to the template untouched.
    pub role: String,
    pub content: MessageContent,
}

impl ChatMessage {
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: MessageContent::Text(text.into()),
        }
    }

    pub fn parts(role: impl Into<String>, parts: Vec<ContentPart>) -> Self {
        Self {
            role: role.into(),
            content: MessageContent::Parts(parts),
        }
    }

    fn to_template_value(&self) -> Value {
        let content = match &self.content {
            MessageContent::Text(text) => Value::from(text.as_str()),
            MessageContent::Parts(parts) => {
                Value::from(parts.iter().map(part_value).collect::<Vec<_>>())
            }
        };
        let mut map = BTreeMap::new();
        map.insert("role".to_owned(), Value::from(self.role.as_str()));
        map.insert("content".to_owned(), content);
        Value::from(map)
    }
}

/// A part in the shape Hugging Face processors pass to chat templates.
fn part_value(part: &ContentPart) -> Value {
    let mut map = BTreeMap::new();
    match part {
        ContentPart::Text(text) => {
            map.insert("type".to_owned(), Value::from("text"));
            map.insert("text".to_owned(), Value::from(text.as_str()));
        }
        ContentPart::Image => {
            map.insert("type".to_owned(), Value::from("image"));
        }
    }
    Value::from(map)
}

/// Limits checked by [`PromptBuilder::build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptLimits {
    /// Longest prompt accepted, counted after image-token expansion.
    pub max_prompt_tokens: usize,
}

impl Default for PromptLimits {
    /// No limit: the caller sets one from the model's context length.
    fn default() -> Self {
        Self {
            max_prompt_tokens: usize::MAX,
        }
    }
}

/// A tokenised prompt ready for the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// Token ids with every `<|image_pad|>` already expanded.
    pub ids: Vec<u32>,
    /// Tokens per image, in prompt order; the model needs them to place image embeddings.
    pub image_token_counts: Vec<usize>,
}

/// Tokenizer plus chat template: turns conversations into prompt ids.
pub struct PromptBuilder {
    tokenizer: Tokenizer,
    env: Environment<'static>,
    /// Ids of [`SpecialToken::ALL`], by [`SpecialToken::index`]; `None` where the vocabulary
    /// lacks the token (an error only once a prompt needs it).
    special_ids: [Option<u32>; SpecialToken::ALL.len()],
    /// The text of every special token of the vocabulary (longest first), which chat text
    /// may not contain unless a request allows it.
    special_texts: Vec<String>,
    limits: PromptLimits,
}

impl std::fmt::Debug for PromptBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptBuilder")
            .field("vocab_size", &self.vocab_size())
            .field("special_ids", &self.special_ids)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl PromptBuilder {
    /// Loads `tokenizer.json`; `chat_template` of `None` selects [`QWEN2_VL_CHAT_TEMPLATE`].
    pub fn from_file(tokenizer_json: &Path, chat_template: Option<String>) -> Result<Self> {
        let tokenizer =
            Tokenizer::from_file(tokenizer_json).map_err(|source| PromptError::LoadTokenizer {
                path: tokenizer_json.to_path_buf(),
                source,
            })?;
        Self::new(tokenizer, chat_template)
    }

    /// Loads `dir/tokenizer.json` and the chat template from, in order of preference,
    /// `tokenizer_config.json`, `chat_template.json`, `chat_template.jinja`, or the built-in
    /// Qwen2-VL template when none of them has one.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let chat_template = chat_template_from_dir(dir)?;
        Self::from_file(&dir.join("tokenizer.json"), chat_template)
    }

    /// The tokenizer of the built-in demo model (`dimple_core::builtin`).
    pub fn builtin() -> Result<Self> {
        let tokenizer = Tokenizer::from_bytes(dimple_core::builtin::TOKENIZER_JSON.as_bytes())
            .map_err(|source| PromptError::LoadTokenizer {
                path: std::path::PathBuf::from("<built-in demo tokenizer>"),
                source,
            })?;
        Self::new(tokenizer, None)
    }

    /// Wraps an already loaded tokenizer.
    pub fn new(tokenizer: Tokenizer, chat_template: Option<String>) -> Result<Self> {
        let source = chat_template.unwrap_or_else(|| QWEN2_VL_CHAT_TEMPLATE.to_owned());
        let env = template_env(source)?;
        let mut special_ids = [None; SpecialToken::ALL.len()];
        for token in SpecialToken::ALL {
            special_ids[token.index()] = tokenizer.token_to_id(token.as_str());
        }
        let mut special_texts: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content)
            .chain(
                SpecialToken::ALL
                    .iter()
                    .filter(|t| special_ids[t.index()].is_some())
                    .map(|t| t.as_str().to_owned()),
            )
            .collect();
        special_texts.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        special_texts.dedup();
        Ok(Self {
            tokenizer,
            env,
            special_ids,
            special_texts,
            limits: PromptLimits::default(),
        })
    }

    pub fn with_limits(mut self, limits: PromptLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> PromptLimits {
        self.limits
    }

    /// The id of a special token, or an error naming it when the vocabulary lacks it.
    pub fn special_id(&self, token: SpecialToken) -> Result<u32> {
        self.special_ids[token.index()].ok_or(PromptError::MissingSpecialToken {
            token: token.as_str(),
        })
    }

    /// The id of any token, special or not, by its vocabulary text.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The first special token written in `text`, if any (the vocabulary's special tokens,
    /// `<|mask|>` and `<|im_end|>` among them).
    pub fn find_special_text(&self, text: &str) -> Option<&str> {
        self.special_texts
            .iter()
            .find(|t| text.contains(t.as_str()))
            .map(String::as_str)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Renders the chat template to text.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(PromptError::EmptyConversation);
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|source| PromptError::RenderTemplate { source })?;
        let messages: Vec<Value> = messages
            .iter()
            .map(ChatMessage::to_template_value)
            .collect();
        template
            .render(context! { messages, add_generation_prompt })
            .map_err(|source| PromptError::RenderTemplate { source })
    }

    /// Renders with the generation prompt, tokenises, and expands each image placeholder to
    /// its image's token count (`image_token_counts`, in prompt order).
    pub fn build(&self, messages: &[ChatMessage], image_token_counts: &[usize]) -> Result<Prompt> {
        Ok(self.build_spans(messages, image_token_counts)?.0)
    }

    /// [`Self::build`], also returning the rendered text and each id's byte offsets in it
    /// (an expanded image token repeats its placeholder's offsets).
    pub fn build_spans(
        &self,
        messages: &[ChatMessage],
        image_token_counts: &[usize],
    ) -> Result<(Prompt, String, ByteSpans)> {
        let text = self.render(messages, true)?;
        // A special token the tokenizer lacks would silently become several ordinary tokens.
        for token in SpecialToken::ALL {
            if text.contains(token.as_str()) {
                self.special_id(token)?;
            }
        }
        if let Some(index) = image_token_counts.iter().position(|&n| n == 0) {
            return Err(PromptError::EmptyImage { index });
        }
        let image_pad = match self.special_ids[SpecialToken::ImagePad.index()] {
            Some(id) => Some(id),
            None if image_token_counts.is_empty() => None,
            None => self.special_id(SpecialToken::ImagePad).map(Some)?,
        };

        let (ids, offsets) = self.encode_with_offsets(&text)?;
        let placeholders = ids.iter().filter(|&&id| Some(id) == image_pad).count();
        if placeholders != image_token_counts.len() {
            return Err(PromptError::ImageCountMismatch {
                placeholders,
                counts: image_token_counts.len(),
            });
        }
        let tokens = image_token_counts
            .iter()
            .fold(ids.len() - placeholders, |acc, &n| acc.saturating_add(n));
        if tokens > self.limits.max_prompt_tokens {
            return Err(PromptError::PromptTooLong {
                tokens,
                max_prompt_tokens: self.limits.max_prompt_tokens,
            });
        }

        let mut expanded = Vec::with_capacity(tokens);
        let mut spans = Vec::with_capacity(tokens);
        let mut counts = image_token_counts.iter();
        for (id, span) in ids.into_iter().zip(offsets) {
            if Some(id) == image_pad {
                // The placeholder count equals the number of counts (checked above).
                let n = counts.next().copied().unwrap_or(0);
                expanded.extend(std::iter::repeat_n(id, n));
                spans.extend(std::iter::repeat_n(span, n));
            } else {
                expanded.push(id);
                spans.push(span);
            }
        }
        let prompt = Prompt {
            ids: expanded,
            image_token_counts: image_token_counts.to_vec(),
        };
        Ok((prompt, text, spans))
    }

    /// Tokenises raw text like [`Self::encode_text`], with each id's byte offsets in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, ByteSpans)> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|source| PromptError::Tokenize { source })?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// Tokenises raw text without adding special tokens; special-token text in it still
    /// becomes the single special id.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|source| PromptError::Tokenize { source })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Turns ids back into text, optionally dropping special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        // The tokenizer skips unknown ids silently, which would hide an engine bug.
        if let Some(&id) = ids
            .iter()
            .find(|&&id| self.tokenizer.id_to_token(id).is_none())
        {
            return Err(PromptError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size(),
            });
        }
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|source| PromptError::Decode { source })
    }
}

/// A template environment configured like Hugging Face's chat-template sandbox.
fn template_env(source: String) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|source| PromptError::CompileTemplate { source })?;
    env.set_syntax(syntax);
    // Prompts are not HTML: never escape message text.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_template_owned(TEMPLATE_NAME, source)
        .map_err(|source| PromptError::CompileTemplate { source })?;
    Ok(env)
}

fn chat_template_from_dir(dir: &Path) -> Result<Option<String>> {
    for name in ["tokenizer_config.json", "chat_template.json"] {
        let path = dir.join(name);
        if path.is_file()
            && let Some(template) = chat_template_field(&path)?
        {
            return Ok(Some(template));
        }
    }
    let path = dir.join("chat_template.jinja");
    if path.is_file() {
        let template = std::fs::read_to_string(&path)
            .map_err(|source| PromptError::ReadFile { path, source })?;
        return Ok(Some(template));
    }
    Ok(None)
}

/// Reads the `chat_template` field: a string, or a list of `{name, template}` from which the
/// one named `default` is taken (both forms exist in Hugging Face configs).
fn chat_template_field(path: &Path) -> Result<Option<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| PromptError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| PromptError::ParseJson {
            path: path.to_path_buf(),
            source,
        })?;
    let bad = |reason: &str| PromptError::BadChatTemplateField {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    match json.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(template)) => Ok(Some(template.clone())),
        Some(serde_json::Value::Array(entries)) => entries
            .iter()
            .find(|entry| entry.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|entry| entry.get("template"))
            .and_then(|t| t.as_str())
            .map(|t| Some(t.to_owned()))
            .ok_or_else(|| bad("is a list without a `default` entry holding a `template` string")),
        Some(_) => Err(bad("must be a string or a list of {name, template}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> PromptBuilder {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/demo_tokenizer/tokenizer.json"
        ));
        PromptBuilder::from_file(path, None).unwrap()
    }

    #[test]
    fn builder_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PromptBuilder>();
    }

    #[test]
    fn template_field_accepts_string_and_named_list() {
        let dir = std::env::temp_dir().join(format!("dimple-prompt-field-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cfg.json");

        std::fs::write(&path, r#"{"chat_template": "A"}"#).unwrap();
        assert_eq!(chat_template_field(&path).unwrap().as_deref(), Some("A"));

        std::fs::write(
            &path,
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        assert_eq!(chat_template_field(&path).unwrap().as_deref(), Some("D"));

        std::fs::write(&path, r#"{"model_max_length": 10}"#).unwrap();
        assert_eq!(chat_template_field(&path).unwrap(), None);

        std::fs::write(&path, r#"{"chat_template": 3}"#).unwrap();
        assert!(matches!(
            chat_template_field(&path),
            Err(PromptError::BadChatTemplateField { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn raise_exception_surfaces_as_render_error() {
        let tokenizer = demo().tokenizer;
        let builder = PromptBuilder::new(
            tokenizer,
            Some("{{ raise_exception('roles must alternate') }}".to_owned()),
        )
        .unwrap();
        let err = builder
            .render(&[ChatMessage::text("user", "hi")], true)
            .unwrap_err();
        assert!(matches!(err, PromptError::RenderTemplate { .. }));
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn message_text_is_not_html_escaped() {
        let text = demo()
            .render(&[ChatMessage::text("user", "a < b & \"c\"")], false)
            .unwrap();
        assert!(text.contains("a < b & \"c\""), "{text}");
    }
}
