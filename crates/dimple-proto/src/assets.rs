//! The prompt assets a worker hands to routers (`GetPromptAssets`): which files of a model
//! directory a router reads to build prompts, and the check that a received file name is one
//! of them (a router writes the files into a directory, so a name must never be a path).

/// Files of a model directory that prompt building reads: the tokenizer, the places a chat
/// template can live (in the order a router looks for it), and the image preprocessing
/// settings. Only `tokenizer.json` is required.
pub const PROMPT_ASSET_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
];

/// The one file a router cannot do without.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Whether `name` is one of [`PROMPT_ASSET_FILES`].
pub fn is_prompt_asset(name: &str) -> bool {
    PROMPT_ASSET_FILES.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_listed_plain_names_are_assets() {
        assert!(is_prompt_asset("tokenizer.json"));
        assert!(is_prompt_asset(TOKENIZER_FILE));
        for bad in [
            "../tokenizer.json",
            "/etc/passwd",
            "model.safetensors",
            "",
            "sub/tokenizer.json",
        ] {
            assert!(!is_prompt_asset(bad), "{bad:?} accepted");
        }
    }
}
