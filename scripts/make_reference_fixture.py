"""Writes the tiny-Qwen3 fixture of tests/reference.rs: a 2-layer Qwen3 with random bf16 weights
(norm weights spread out, a large k_norm outlier) saved by transformers, and the logits that
transformers computes for a token sequence with the weights upcast to f32 (eager attention).

Needs torch and transformers (the GPU machine has both); runs on the CPU:

    python3 scripts/make_reference_fixture.py OUT_DIR
writes OUT_DIR/tiny-qwen3/{config.json,model.safetensors} and OUT_DIR/tiny_qwen3_logits.json.
"""
import json
import sys
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def main(out: Path) -> None:
    torch.manual_seed(1234)
    config = Qwen3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            elif "k_norm" in name:
                p.copy_(torch.rand_like(p) * 2.5 + 0.5)
                p[3] = 40.0
            else:
                p.copy_(torch.rand_like(p) * 1.5 + 0.5)
    model = model.to(torch.bfloat16)
    model_dir = out / "tiny-qwen3"
    model.save_pretrained(model_dir, safe_serialization=True)
    for extra in ["generation_config.json"]:
        (model_dir / extra).unlink(missing_ok=True)

    reference = Qwen3ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    tokens = torch.randint(0, config.vocab_size, (1, 40))
    with torch.no_grad():
        logits = reference(tokens).logits[0].float()
    fixture = {"tokens": tokens[0].tolist(), "logits": [[round(v, 6) for v in row] for row in logits.tolist()]}
    (out / "tiny_qwen3_logits.json").write_text(json.dumps(fixture) + "\n")
    print(f"wrote {model_dir} and {out / 'tiny_qwen3_logits.json'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
