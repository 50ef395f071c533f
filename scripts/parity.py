"""Parity of braidinfer's GPU logits with transformers on the synthetic 28-layer Qwen3-0.6B.

On the GPU machine (python3 with torch + transformers), from the bundle:
    python3 scripts/parity.py --bundle dist --work /tmp/parity [--json OUT.json]

1. `braidinfer --synthetic --save-synthetic` writes the model directory (norm weights with
   outliers, k_norm up to ~96).
2. A prompt of 100+ tokens plus 64 teacher-forced tokens runs through transformers with the
   weights upcast to f32 (the reference), through transformers in bf16, and through braidinfer
   (prefill, then one decode-graph replay per forced token: src/bin/dump-logits.rs).
3. Bars, at every position: braidinfer's relative L2 error against f32 is at most 1.5x that of
   transformers' bf16 run, and braidinfer's greedy token equals the f32 argmax unless the f32
   top-2 margin is a near-tie (below the bf16 run's own max absolute logit error there).
Exits non-zero when a bar fails; prints the error table last.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = (
    "The history of computing is a story of ideas that took decades to become practical. "
    "Charles Babbage designed the Analytical Engine in the 1830s, a mechanical computer with a "
    "store and a mill, and Ada Lovelace wrote what many consider the first program for it. "
    "A century later, Alan Turing described a universal machine that could simulate any other, "
    "and during the war, engineers built electronic machines to break codes and compute firing "
    "tables. The transistor replaced the vacuum tube, the integrated circuit packed thousands of "
    "transistors onto a chip, and Moore's observation that their number doubled every two years "
    "held for half a century. Today a graphics processor holds tens of billions of transistors, "
    "and its memory bandwidth, not its arithmetic, limits how fast a small language model can "
    "write the next word. 这就是为什么推理引擎要把权重尽快地流过芯片。 Each decode step streams "
    "every weight once, so the engine that wastes the fewest cycles between kernels wins."
)
PROMPT_LEN = 110
FORCED = 64


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="dist")
    ap.add_argument("--work", default="/tmp/parity")
    ap.add_argument("--json")
    args = ap.parse_args()
    bundle, work = Path(args.bundle).resolve(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "synthetic-qwen3"
    subprocess.run([str(bundle / "braidinfer"), "--synthetic", "--save-synthetic", str(model_dir)], check=True)

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode(TEXT, add_special_tokens=False)[: PROMPT_LEN + FORCED]
    assert len(ids) == PROMPT_LEN + FORCED, f"text gives only {len(ids)} tokens"
    (work / "tokens.json").write_text(json.dumps(ids))

    def run_transformers(dtype):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
        with torch.no_grad():
            out = model(torch.tensor([ids], device="cuda")).logits[0].float().cpu().numpy()
        del model
        torch.cuda.empty_cache()
        return out.astype(np.float64)

    ref = run_transformers(torch.float32)
    hf_bf16 = run_transformers(torch.bfloat16)
    ours_path = work / "braidinfer_logits.f32"
    subprocess.run(
        [str(bundle / "dump-logits"), "--model", str(model_dir), "--tokens", str(work / "tokens.json"),
         "--prompt-len", str(PROMPT_LEN), "--out", str(ours_path)],
        check=True,
    )
    ours = np.fromfile(ours_path, dtype="<f4").reshape(len(ids), -1).astype(np.float64)

    def rel_l2(a, b):
        return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)

    err_ours, err_bf16 = rel_l2(ours, ref), rel_l2(hf_bf16, ref)
    ratio = err_ours / err_bf16
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    tie_tolerance = np.abs(hf_bf16 - ref).max(axis=1)
    decided = margin > tie_tolerance
    greedy_match = ours.argmax(axis=1) == ref.argmax(axis=1)
    bf16_match = hf_bf16.argmax(axis=1) == ref.argmax(axis=1)

    ok_error = bool((ratio <= 1.5).all())
    ok_greedy = bool(greedy_match[decided].all())
    phases = {"prompt (prefill)": slice(0, PROMPT_LEN), "teacher-forced decode": slice(PROMPT_LEN, len(ids))}
    report = {
        "positions": len(ids), "prompt_len": PROMPT_LEN, "forced_steps": FORCED,
        "max_ratio": float(ratio.max()), "max_err_braidinfer": float(err_ours.max()),
        "max_err_transformers_bf16": float(err_bf16.max()),
        "greedy_match_decided": f"{int(greedy_match[decided].sum())}/{int(decided.sum())}",
        "greedy_match_all": f"{int(greedy_match.sum())}/{len(ids)}",
        "transformers_bf16_greedy_match_all": f"{int(bf16_match.sum())}/{len(ids)}",
        "pass": ok_error and ok_greedy,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print("\nparity with transformers (relative L2 error of logits against transformers f32):")
    print(f"{'positions':<24}{'braidinfer mean':>16}{'max':>10}{'hf bf16 mean':>14}{'max':>10}{'max ratio':>11}")
    for name, s in phases.items():
        print(f"{name:<24}{err_ours[s].mean():>16.2e}{err_ours[s].max():>10.2e}{err_bf16[s].mean():>14.2e}"
              f"{err_bf16[s].max():>10.2e}{ratio[s].max():>11.2f}")
    print(f"greedy token = f32 argmax: {report['greedy_match_decided']} decided positions "
          f"({report['greedy_match_all']} of all; transformers bf16: {report['transformers_bf16_greedy_match_all']})")
    print(f"parity: {'PASS' if report['pass'] else 'FAIL'} (error ratio <= 1.5 at every position: {ok_error}; "
          f"greedy on decided positions: {ok_greedy})")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
