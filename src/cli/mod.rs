//! The `braidinfer` command line: arguments parsed by clap, validated into a typed run, run.

mod answer;

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use clap::{Parser, ValueEnum};

use crate::config::ModelConfig;
use crate::gpu::Gpu;
use crate::model::Model;
use crate::model_source::{resolve_model, tokenizer_dir};
use crate::quant::Quant;
use crate::sampling::{SamplingParams, MAX_TOP_K};
use crate::synthetic::write_model_dir;
use crate::tokenizer::ChatMessage;

const ABOUT: &str = "Fast local decoding of Qwen3-0.6B: hand-written CUDA kernels, the whole decode step replayed as one CUDA graph.";

const LONG_ABOUT: &str = "\
Fast local decoding of Qwen3-0.6B: hand-written CUDA kernels, the whole decode step replayed as
one CUDA graph. The answer streams to stdout as it is generated; errors and --stats go to stderr.

Examples:
  braidinfer --prompt \"Why is the sky blue?\"                 (downloads Qwen/Qwen3-0.6B once)
  braidinfer --model ./Qwen3-0.6B --prompt \"Hi\" --no-think   (a local model directory)
  braidinfer --synthetic --prompt \"Hi\" --stats              (random weights, real speed)
  braidinfer --prompts questions.txt --batch 64 --stats     (one prompt per line, batched)
  braidinfer --synthetic --save-synthetic ./synthetic-qwen3  (write that model for transformers)

Backends: the GPU by default (--backend auto falls back to the f32 CPU reference, slowly, when
no CUDA GPU is usable, and says so); --backend gpu insists on the GPU; --backend cpu runs the
CPU reference, the correctness oracle.";

#[derive(Parser, Debug)]
#[command(name = "braidinfer", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Args {
    /// The user message (rendered with the model's chat template unless --raw).
    #[arg(long)]
    pub prompt: Option<String>,

    /// A file of user messages, one per line (blank lines skipped; `-`: standard input),
    /// generated together, up to --batch at a time; each answer is printed whole when it
    /// finishes.
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    pub prompts: Option<PathBuf>,

    /// With --prompts: the most sequences decoded together (a finished one's slot goes to the
    /// next waiting prompt at once).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub batch: usize,

    /// Local model directory, or a Hugging Face repo id resolved through the Hugging Face cache.
    #[arg(long, default_value = "Qwen/Qwen3-0.6B")]
    pub model: String,

    /// Seeded random weights of the real Qwen3-0.6B shapes and the real tokenizer; no download.
    #[arg(long)]
    pub synthetic: bool,

    /// With --synthetic: number of layers (the real model has 28).
    #[arg(long, default_value_t = 28, value_name = "N")]
    pub layers: usize,

    /// With --synthetic: the seed of the weights.
    #[arg(long, default_value_t = 0, value_name = "SEED")]
    pub weights_seed: u64,

    /// With --synthetic: directory holding tokenizer.json and tokenizer_config.json.
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,

    /// With --synthetic: write the model as a directory transformers can load, then exit.
    #[arg(long, value_name = "DIR")]
    pub save_synthetic: Option<PathBuf>,

    /// Most tokens to generate (generation also stops at <|im_end|> or <|endoftext|>).
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_tokens: usize,

    /// Sampling temperature; 0 is greedy. Default: the model's generation_config.json (0.6).
    #[arg(long)]
    pub temperature: Option<f32>,

    /// Keep the K most likely tokens, 1 to 64. Default: generation_config.json (20).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,

    /// Keep the smallest set of tokens whose probability reaches P, in (0, 1]. Default: generation_config.json (0.95).
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,

    /// Seed of the sampler: the same seed reproduces a run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,

    /// Ask Qwen3 to answer without a `<think>` block (enable_thinking=false in the template).
    #[arg(long)]
    pub no_think: bool,

    /// Print prompt length, prefill tok/s, time to first token and decode tok/s to stderr (with
    /// --prompts: the totals, overall tok/s and the range of times to first token).
    #[arg(long)]
    pub stats: bool,

    /// Where to run.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,

    /// GPU memory for the KV cache, in GB. Default: enough for a full context per sequence
    /// decoded together, within 90% of the free memory.
    #[arg(long, value_name = "GB")]
    pub kv_cache_gb: Option<f64>,

    /// Weights of the linear layers and the LM head: bf16 as in the checkpoint, or symmetric
    /// per-channel INT8 quantized at load (on the CPU backend: the same INT8 round trip).
    #[arg(long, value_enum, default_value_t = Quant::Bf16)]
    pub quant: Quant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The GPU when one is usable, else the CPU reference.
    Auto,
    /// The CUDA engine; an error when no GPU is usable.
    Gpu,
    /// The f32 CPU reference forward pass.
    Cpu,
}

/// What the run does.
enum Input {
    /// Writes the synthetic model to this directory (--save-synthetic), and nothing else.
    Save(PathBuf),
    One(String),
    /// --prompts: one message per non-blank line.
    Many(Vec<String>),
}

/// Arguments checked before any model file is touched.
struct Validated {
    input: Input,
    max_tokens: usize,
}

fn validate(args: &Args) -> Result<Validated> {
    ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    ensure!(args.layers > 0, "--layers must be at least 1");
    if let Some(t) = args.temperature {
        ensure!(
            t.is_finite() && t >= 0.0,
            "--temperature must be >= 0 (0 = greedy), got {t}"
        );
    }
    if let Some(p) = args.top_p {
        ensure!(p > 0.0 && p <= 1.0, "--top-p must be in (0, 1], got {p}");
    }
    if let Some(gb) = args.kv_cache_gb {
        ensure!(
            gb.is_finite() && gb > 0.0,
            "--kv-cache-gb must be positive, got {gb}"
        );
    }
    if let Some(k) = args.top_k {
        ensure!(
            (1..=MAX_TOP_K).contains(&k),
            "--top-k must be between 1 and {MAX_TOP_K}, got {k}"
        );
    }
    ensure!(args.batch > 0, "--batch must be at least 1");
    let input = match (&args.save_synthetic, &args.prompt, &args.prompts) {
        (Some(_), ..) if !args.synthetic => anyhow::bail!("--save-synthetic needs --synthetic"),
        (Some(dir), ..) => Input::Save(dir.clone()),
        (_, Some(p), _) if p.trim().is_empty() => anyhow::bail!("the prompt is empty"),
        (_, Some(p), _) => Input::One(p.clone()),
        (_, None, Some(file)) => Input::Many(read_prompts(file)?),
        (_, None, None) => anyhow::bail!("--prompt or --prompts is required (see --help)"),
    };
    Ok(Validated {
        input,
        max_tokens: args.max_tokens,
    })
}

/// The non-blank lines of `file` (`-`: standard input).
fn read_prompts(file: &Path) -> Result<Vec<String>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
            .context("reading the prompts from standard input")?
    } else {
        std::fs::read_to_string(file)
            .with_context(|| format!("reading the prompts file {}", file.display()))?
    };
    let prompts: Vec<String> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_string)
        .collect();
    ensure!(
        !prompts.is_empty(),
        "the prompts file {} has no prompt (one per line)",
        file.display()
    );
    Ok(prompts)
}

fn load(args: &Args) -> Result<Model> {
    if args.synthetic {
        let config = ModelConfig {
            layers: args.layers,
            ..ModelConfig::qwen3_0_6b()
        };
        let dir = tokenizer_dir(args.tokenizer.as_deref())?;
        return Model::synthetic(config, args.weights_seed, &dir);
    }
    Model::load(&resolve_model(&args.model)?)
}

/// Runs the command line; errors come back with their chain for `main` to print.
pub fn run(args: Args) -> Result<()> {
    let validated = validate(&args)?;
    let model = load(&args)?;
    let params = SamplingParams {
        temperature: args.temperature.unwrap_or(model.generation.temperature),
        top_k: args
            .top_k
            .unwrap_or(model.generation.top_k.clamp(1, MAX_TOP_K)),
        top_p: args.top_p.unwrap_or(model.generation.top_p),
        seed: args.seed,
    };
    params.validate()?;
    match validated.input {
        Input::Save(dir) => {
            let tokenizer = tokenizer_dir(args.tokenizer.as_deref())?;
            write_model_dir(&dir, &model.config, &model.weights, &tokenizer)?;
            eprintln!("wrote {}", dir.display());
            Ok(())
        }
        Input::One(text) => answer::answer_one(&args, &model, params, &text, validated.max_tokens),
        Input::Many(texts) => {
            answer::answer_many(&args, &model, params, &texts, validated.max_tokens)
        }
    }
}

/// The GPU the backend asks for; None means the CPU reference.
fn open_gpu(backend: Backend) -> Result<Option<Gpu>> {
    match backend {
        Backend::Cpu => Ok(None),
        Backend::Gpu => Gpu::open().map(Some).context("--backend gpu"),
        Backend::Auto => match Gpu::open() {
            Ok(gpu) => Ok(Some(gpu)),
            Err(e) => {
                eprintln!("note: {e:#}; running the CPU reference (slow). Use --backend cpu to silence this.");
                Ok(None)
            }
        },
    }
}

/// The token ids of `prompt`: through the chat template (without a `<think>` block when
/// `no_think`) unless `raw`; every id checked against the vocabulary.
pub fn prompt_ids(model: &Model, prompt: &str, raw: bool, no_think: bool) -> Result<Vec<u32>> {
    let text = if raw {
        prompt.to_string()
    } else {
        let thinking = if no_think { Some(false) } else { None };
        model
            .tokenizer
            .apply_chat_template(&[ChatMessage::new("user", prompt)], thinking)?
    };
    let ids = model.tokenizer.encode(&text)?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= model.config.vocab) {
        anyhow::bail!(
            "the tokenizer produced id {bad}, outside the model's vocabulary of {}",
            model.config.vocab
        );
    }
    Ok(ids)
}
