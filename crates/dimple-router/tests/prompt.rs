//! Prompt building against the real Qwen2.5/Dream tokenizer and the demo model's tokenizer.

use std::path::{Path, PathBuf};

use dimple_router::prompt::{
    ChatMessage, ContentPart, PromptBuilder, PromptError, PromptLimits, QWEN2_VL_CHAT_TEMPLATE,
    SpecialToken,
};

const QWEN_TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tokenizer/tokenizer.json"
);
const ENCODE_CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tokenizer/encode_cases.jsonl"
);
const DEMO_TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/demo_tokenizer/tokenizer.json"
);

// Ids from the tokenizer README (Qwen2.5 added tokens plus Dream's mask).
const QWEN_IM_START: u32 = 151644;
const QWEN_IM_END: u32 = 151645;
const QWEN_VISION_START: u32 = 151652;
const QWEN_VISION_END: u32 = 151653;
const QWEN_IMAGE_PAD: u32 = 151655;

// Ids from the demo model README.
const DEMO_ENDOFTEXT: u32 = 432;
const DEMO_IM_START: u32 = 433;
const DEMO_IM_END: u32 = 434;
const DEMO_VISION_START: u32 = 435;
const DEMO_VISION_END: u32 = 436;
const DEMO_IMAGE_PAD: u32 = 438;
const DEMO_MASK: u32 = 440;

fn qwen() -> PromptBuilder {
    PromptBuilder::from_file(Path::new(QWEN_TOKENIZER), None).unwrap()
}

fn demo() -> PromptBuilder {
    PromptBuilder::from_file(Path::new(DEMO_TOKENIZER), None).unwrap()
}

fn image_question(question: &str) -> ChatMessage {
    ChatMessage::parts(
        "user",
        vec![ContentPart::Image, ContentPart::text(question)],
    )
}

/// A fresh folder under the system temp dir, unique per test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dimple-prompt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn encode_cases_match_reference_ids_and_decode_to_nfc() {
    let builder = qwen();
    let text = std::fs::read_to_string(ENCODE_CASES).unwrap();
    let mut checked = 0;
    // Records are split at '\n' only: texts may hold other line separators (U+2028, U+0085)
    // raw, and `str::lines` would not cut there either, but nothing else may.
    for (index, line) in text.split('\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let case: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("line {} is not a whole record: {e}", index + 1));
        let input = case["text"].as_str().unwrap();
        let nfc = case["nfc"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
            .collect();
        let ids = builder.encode_text(input).unwrap();
        assert_eq!(ids, expected, "ids for line {} {input:?}", index + 1);
        assert_eq!(
            builder.decode(&ids, false).unwrap(),
            nfc,
            "decode of line {} {input:?}",
            index + 1
        );
        checked += 1;
    }
    // Every record of the fixture (187, each verified against tiktoken) was checked.
    assert!(checked >= 187, "only {checked} encode cases");
}

#[test]
fn hello_world_anchor() {
    assert_eq!(qwen().encode_text("Hello world").unwrap(), vec![9707, 1879]);
}

#[test]
fn qwen_special_ids_and_vocab_size() {
    let b = qwen();
    assert_eq!(b.special_id(SpecialToken::EndOfText).unwrap(), 151643);
    assert_eq!(b.special_id(SpecialToken::ImStart).unwrap(), QWEN_IM_START);
    assert_eq!(b.special_id(SpecialToken::ImEnd).unwrap(), QWEN_IM_END);
    assert_eq!(
        b.special_id(SpecialToken::VisionStart).unwrap(),
        QWEN_VISION_START
    );
    assert_eq!(
        b.special_id(SpecialToken::VisionEnd).unwrap(),
        QWEN_VISION_END
    );
    assert_eq!(
        b.special_id(SpecialToken::ImagePad).unwrap(),
        QWEN_IMAGE_PAD
    );
    assert_eq!(b.special_id(SpecialToken::Mask).unwrap(), 151666);
    assert_eq!(b.token_id("<|video_pad|>"), Some(151656));
    assert_eq!(b.token_id("no such token"), None);
    // 151643 byte-level BPE ranks plus 24 added tokens (151643..=151666).
    assert_eq!(b.vocab_size(), 151667);
}

#[test]
fn render_text_only_user_message_inserts_default_system() {
    let b = qwen();
    let messages = [ChatMessage::text("user", "What is 3 plus 4?")];
    assert_eq!(
        b.render(&messages, true).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(
        b.render(&messages, false).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n"
    );
}

#[test]
fn render_system_then_image_and_text_keeps_given_system() {
    let b = qwen();
    let messages = [
        ChatMessage::text("system", "You are a terse assistant."),
        image_question("What color is the square?"),
    ];
    assert_eq!(
        b.render(&messages, true).unwrap(),
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n\
         <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color is the square?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn render_multi_turn_with_text_before_and_between_images() {
    let b = qwen();
    let messages = [
        ChatMessage::parts(
            "user",
            vec![
                ContentPart::text("Compare "),
                ContentPart::Image,
                ContentPart::text(" and "),
                ContentPart::Image,
            ],
        ),
        ChatMessage::text("assistant", "They differ."),
        ChatMessage::text("user", "How?"),
    ];
    assert_eq!(
        b.render(&messages, true).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nCompare <|vision_start|><|image_pad|><|vision_end|> and \
         <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n\
         <|im_start|>assistant\nThey differ.<|im_end|>\n\
         <|im_start|>user\nHow?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn build_expands_image_pad_in_place() {
    let b = qwen();
    let messages = [image_question("What color is the square?")];
    let prompt = b.build(&messages, &[12]).unwrap();

    // Added tokens split the text, and each piece between them is encoded on its own.
    let enc = |s: &str| b.encode_text(s).unwrap();
    let mut expected = vec![QWEN_IM_START];
    expected.extend(enc("system\nYou are a helpful assistant."));
    expected.push(QWEN_IM_END);
    expected.extend(enc("\n"));
    expected.push(QWEN_IM_START);
    expected.extend(enc("user\n"));
    expected.push(QWEN_VISION_START);
    expected.extend([QWEN_IMAGE_PAD; 12]);
    expected.push(QWEN_VISION_END);
    expected.extend(enc("What color is the square?"));
    expected.push(QWEN_IM_END);
    expected.extend(enc("\n"));
    expected.push(QWEN_IM_START);
    expected.extend(enc("assistant\n"));

    assert_eq!(prompt.ids, expected);
    assert_eq!(prompt.image_token_counts, vec![12]);
}

#[test]
fn build_two_images_gets_each_its_own_count() {
    let b = qwen();
    let messages = [ChatMessage::parts(
        "user",
        vec![
            ContentPart::Image,
            ContentPart::text("then"),
            ContentPart::Image,
        ],
    )];
    let prompt = b.build(&messages, &[12, 45]).unwrap();
    let ids = &prompt.ids;

    let first = ids.iter().position(|&id| id == QWEN_IMAGE_PAD).unwrap();
    assert_eq!(ids[first - 1], QWEN_VISION_START);
    assert!(
        ids[first..first + 12]
            .iter()
            .all(|&id| id == QWEN_IMAGE_PAD)
    );
    assert_eq!(ids[first + 12], QWEN_VISION_END);

    let then = b.encode_text("then").unwrap();
    let after = first + 13;
    assert_eq!(ids[after..after + then.len()], then[..]);

    let second = after + then.len();
    assert_eq!(ids[second], QWEN_VISION_START);
    assert!(
        ids[second + 1..second + 46]
            .iter()
            .all(|&id| id == QWEN_IMAGE_PAD)
    );
    assert_eq!(ids[second + 46], QWEN_VISION_END);
    assert_eq!(ids.iter().filter(|&&id| id == QWEN_IMAGE_PAD).count(), 57);
}

#[test]
fn build_rejects_image_count_mismatch() {
    let b = qwen();
    let with_image = [image_question("What is this?")];
    let text_only = [ChatMessage::text("user", "hi")];

    let err = b.build(&with_image, &[]).unwrap_err();
    assert!(
        matches!(
            err,
            PromptError::ImageCountMismatch {
                placeholders: 1,
                counts: 0
            }
        ),
        "{err:?}"
    );
    let err = b.build(&with_image, &[4, 4]).unwrap_err();
    assert!(
        matches!(
            err,
            PromptError::ImageCountMismatch {
                placeholders: 1,
                counts: 2
            }
        ),
        "{err:?}"
    );
    let err = b.build(&text_only, &[4]).unwrap_err();
    assert!(
        matches!(
            err,
            PromptError::ImageCountMismatch {
                placeholders: 0,
                counts: 1
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("<|image_pad|>"), "{err}");
}

#[test]
fn build_rejects_zero_token_image() {
    let err = qwen()
        .build(&[image_question("What is this?")], &[0])
        .unwrap_err();
    assert!(
        matches!(err, PromptError::EmptyImage { index: 0 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("image_token_counts[0]"), "{err}");
}

#[test]
fn empty_conversation_is_an_error() {
    let b = qwen();
    assert!(matches!(
        b.render(&[], true),
        Err(PromptError::EmptyConversation)
    ));
    let err = b.build(&[], &[]).unwrap_err();
    assert!(matches!(err, PromptError::EmptyConversation));
    assert!(err.to_string().contains("messages"), "{err}");
}

#[test]
fn prompt_length_limit_counts_expanded_image_tokens() {
    let messages = [image_question("What color is the square?")];
    let unlimited = demo().build(&messages, &[16]).unwrap();
    let len = unlimited.ids.len();

    let at_limit = demo()
        .with_limits(PromptLimits {
            max_prompt_tokens: len,
        })
        .build(&messages, &[16])
        .unwrap();
    assert_eq!(at_limit, unlimited);

    let limited = demo().with_limits(PromptLimits {
        max_prompt_tokens: len - 1,
    });
    let err = limited.build(&messages, &[16]).unwrap_err();
    assert!(
        matches!(err, PromptError::PromptTooLong { tokens, max_prompt_tokens } if tokens == len && max_prompt_tokens == len - 1),
        "{err:?}"
    );
    assert!(err.to_string().contains("max_prompt_tokens"), "{err}");

    // The same text with fewer image tokens fits: the limit applies after expansion.
    let shorter = limited.build(&messages, &[15]).unwrap();
    assert_eq!(shorter.ids.len(), len - 1);
}

#[test]
fn demo_special_ids_match_readme() {
    let b = demo();
    assert_eq!(
        b.special_id(SpecialToken::EndOfText).unwrap(),
        DEMO_ENDOFTEXT
    );
    assert_eq!(b.special_id(SpecialToken::ImStart).unwrap(), DEMO_IM_START);
    assert_eq!(b.special_id(SpecialToken::ImEnd).unwrap(), DEMO_IM_END);
    assert_eq!(
        b.special_id(SpecialToken::VisionStart).unwrap(),
        DEMO_VISION_START
    );
    assert_eq!(
        b.special_id(SpecialToken::VisionEnd).unwrap(),
        DEMO_VISION_END
    );
    assert_eq!(
        b.special_id(SpecialToken::ImagePad).unwrap(),
        DEMO_IMAGE_PAD
    );
    assert_eq!(b.special_id(SpecialToken::Mask).unwrap(), DEMO_MASK);
    assert_eq!(b.token_id("<|vision_pad|>"), Some(437));
    assert_eq!(b.token_id("<|video_pad|>"), Some(439));
    assert_eq!(b.vocab_size(), 441);
}

#[test]
fn demo_prompt_uses_demo_ids() {
    let b = demo();
    let question = "What color is the square?";
    let prompt = b.build(&[image_question(question)], &[16]).unwrap();
    let ids = &prompt.ids;

    // The demo README's prompt, with its single image pad expanded to 16 (112x112 image).
    let text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
                <|vision_start|><|image_pad|><|vision_end|>What color is the square?<|im_end|>\n\
                <|im_start|>assistant\n";
    let expanded = text.replace("<|image_pad|>", &"<|image_pad|>".repeat(16));
    assert_eq!(b.decode(ids, false).unwrap(), expanded);

    assert_eq!(ids[0], DEMO_IM_START);
    let pad = ids.iter().position(|&id| id == DEMO_IMAGE_PAD).unwrap();
    assert_eq!(ids[pad - 1], DEMO_VISION_START);
    assert!(ids[pad..pad + 16].iter().all(|&id| id == DEMO_IMAGE_PAD));
    assert_eq!(ids[pad + 16], DEMO_VISION_END);
    let q = b.encode_text(question).unwrap();
    assert_eq!(ids[pad + 17..pad + 17 + q.len()], q[..]);
    assert_eq!(ids[pad + 17 + q.len()], DEMO_IM_END);
    let tail = b.encode_text("assistant\n").unwrap();
    assert_eq!(ids[ids.len() - tail.len()..], tail[..]);
    assert_eq!(ids[ids.len() - tail.len() - 1], DEMO_IM_START);
    // Every id comes from the demo vocabulary, none from Qwen's.
    assert!(ids.iter().all(|&id| id < 441));
    assert_eq!(ids.iter().filter(|&&id| id == DEMO_IM_START).count(), 3);
    assert_eq!(ids.iter().filter(|&&id| id == DEMO_IM_END).count(), 2);
}

#[test]
fn demo_decodes_reference_responses() {
    // `response_ids` and `pred` of items s101-0003 and s101-0001 in demo_eval's
    // reference_outputs.jsonl: answer tokens, `<|im_end|>`, then `<|endoftext|>` padding.
    let b = demo();
    let mut blue = vec![362, DEMO_IM_END];
    blue.extend([DEMO_ENDOFTEXT; 14]);
    assert_eq!(b.decode(&blue, true).unwrap().trim(), "blue");
    assert!(
        b.decode(&blue, false)
            .unwrap()
            .starts_with("blue<|im_end|><|endoftext|>")
    );

    let mut words = vec![431, 387, DEMO_IM_END];
    words.extend([DEMO_ENDOFTEXT; 13]);
    assert_eq!(b.decode(&words, true).unwrap().trim(), "bird river");
}

#[test]
fn decode_rejects_ids_outside_vocabulary() {
    let err = demo().decode(&[5, 441], false).unwrap_err();
    assert!(
        matches!(
            err,
            PromptError::UnknownTokenId {
                id: 441,
                vocab_size: 441
            }
        ),
        "{err:?}"
    );
}

#[test]
fn missing_special_token_errors_only_when_needed() {
    // The demo tokenizer with `<|image_pad|>` renamed (removing it would renumber the
    // added tokens after it).
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DEMO_TOKENIZER).unwrap()).unwrap();
    let added = json["added_tokens"].as_array_mut().unwrap();
    let pad = added
        .iter_mut()
        .find(|t| t["content"] == "<|image_pad|>")
        .unwrap();
    pad["content"] = "<|image_placeholder|>".into();
    let dir = temp_dir("missing-pad");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let b = PromptBuilder::from_file(&path, None).unwrap();

    let err = b.special_id(SpecialToken::ImagePad).unwrap_err();
    assert!(err.to_string().contains("<|image_pad|>"), "{err}");
    assert_eq!(b.special_id(SpecialToken::Mask).unwrap(), DEMO_MASK);

    // Text-only prompts never need it.
    let text = b
        .build(&[ChatMessage::text("user", "What is 3 plus 4?")], &[])
        .unwrap();
    assert_eq!(text.ids[0], DEMO_IM_START);

    let err = b
        .build(&[image_question("What is this?")], &[16])
        .unwrap_err();
    assert!(
        matches!(
            err,
            PromptError::MissingSpecialToken {
                token: "<|image_pad|>"
            }
        ),
        "{err:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn from_dir_template_sources_in_order() {
    let dir = temp_dir("from-dir");
    std::fs::copy(DEMO_TOKENIZER, dir.join("tokenizer.json")).unwrap();
    let messages = [ChatMessage::text("user", "hi")];

    // Nothing but the tokenizer: the built-in Qwen2-VL template.
    let builtin = PromptBuilder::from_dir(&dir).unwrap();
    assert_eq!(
        builtin.render(&messages, true).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );

    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}J:{{ m['content'] }}{% endfor %}",
    )
    .unwrap();
    assert_eq!(
        PromptBuilder::from_dir(&dir)
            .unwrap()
            .render(&messages, true)
            .unwrap(),
        "J:hi"
    );

    std::fs::write(
        dir.join("chat_template.json"),
        r#"{"chat_template": "{% for m in messages %}C:{{ m['content'] }}{% endfor %}"}"#,
    )
    .unwrap();
    assert_eq!(
        PromptBuilder::from_dir(&dir)
            .unwrap()
            .render(&messages, true)
            .unwrap(),
        "C:hi"
    );

    // A tokenizer_config.json without a template does not hide the others.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"model_max_length": 32768}"#,
    )
    .unwrap();
    assert_eq!(
        PromptBuilder::from_dir(&dir)
            .unwrap()
            .render(&messages, true)
            .unwrap(),
        "C:hi"
    );

    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}T:{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"}"#,
    )
    .unwrap();
    let from_config = PromptBuilder::from_dir(&dir).unwrap();
    assert_eq!(from_config.render(&messages, true).unwrap(), "T:hi>");
    assert_eq!(from_config.render(&messages, false).unwrap(), "T:hi");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn builtin_template_matches_explicit_copy() {
    // Passing the README template explicitly behaves like the default.
    let explicit = PromptBuilder::from_file(
        Path::new(DEMO_TOKENIZER),
        Some(QWEN2_VL_CHAT_TEMPLATE.to_owned()),
    )
    .unwrap();
    let messages = [image_question("Describe the image.")];
    assert_eq!(
        explicit.build(&messages, &[16]).unwrap(),
        demo().build(&messages, &[16]).unwrap()
    );
}

#[test]
fn load_errors_name_the_file() {
    let missing = Path::new("/nonexistent/dimple/tokenizer.json");
    let err = PromptBuilder::from_file(missing, None).unwrap_err();
    assert!(matches!(err, PromptError::LoadTokenizer { .. }));
    assert!(
        err.to_string()
            .contains("/nonexistent/dimple/tokenizer.json"),
        "{err}"
    );

    let err = PromptBuilder::from_file(Path::new(DEMO_TOKENIZER), Some("{% for %}".to_owned()))
        .unwrap_err();
    assert!(
        matches!(err, PromptError::CompileTemplate { .. }),
        "{err:?}"
    );

    let dir = temp_dir("bad-config");
    std::fs::copy(DEMO_TOKENIZER, dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{not json").unwrap();
    let err = PromptBuilder::from_dir(&dir).unwrap_err();
    assert!(matches!(err, PromptError::ParseJson { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
