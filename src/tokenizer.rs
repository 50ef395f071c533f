//! Text <-> token ids: the Hugging Face tokenizer (tokenizer.json), the chat template from
//! tokenizer_config.json rendered as transformers renders it, and streaming detokenization.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
}

#[derive(Serialize, Clone, Debug)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json` and, if present, the chat template of `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(anyhow!("{}: not found", path.display()));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("{}: malformed tokenizer file ({e})", path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let chat_template = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: malformed JSON", config_path.display()))?;
            json.get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        } else {
            None
        };
        Ok(Self {
            inner,
            chat_template,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("detokenizing: {e}"))
    }

    /// The conversation rendered as `apply_chat_template(..., add_generation_prompt=True)` does;
    /// `enable_thinking: Some(false)` is Qwen3's switch for answering without a think block.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        enable_thinking: Option<bool>,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .context("tokenizer_config.json has no chat_template (use --raw)")?;
        let mut env = minijinja::Environment::new();
        // transformers renders with these two settings; the template's whitespace relies on them.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template("chat", template)
            .context("parsing the chat template")?;
        let context = minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => true,
            enable_thinking => enable_thinking,
        };
        env.get_template("chat")?
            .render(context)
            .context("rendering the chat template")
    }
}

/// Turns a growing list of token ids into text pieces, never emitting a piece that ends inside
/// a multi-byte character: a piece is held back while its decoded tail is U+FFFD.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window re-decoded for each token (context for the tokenizer's decoder).
    prefix_offset: usize,
    /// End of what has been emitted, in ids.
    read_offset: usize,
    emitted: String,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            emitted: String::new(),
        }
    }

    /// Adds a token; returns the text that became final, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&prefix) {
            let piece = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.emitted.push_str(&piece);
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// The rest of the text, so that everything emitted equals the full decode.
    pub fn finish(&mut self) -> Result<String> {
        let full = self.tokenizer.decode(&self.ids)?;
        let rest = match full.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_string(),
            None => return Err(anyhow!("streamed text diverged from the full decode")),
        };
        self.emitted = full;
        Ok(rest)
    }
}
