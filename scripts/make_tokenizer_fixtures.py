"""Writes tests/fixtures/tokenizer_ids.json and tests/fixtures/chat_template.json: the token ids
and chat-template renderings that the Hugging Face tokenizer and transformers produce for the
real Qwen3 tokenizer. Run once (needs `pip install transformers tokenizers jinja2`):

    python3 scripts/make_tokenizer_fixtures.py ../shared/models/qwen3-0.6b
"""
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.\n\nSecond paragraph,   with  odd   spacing.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { println!(\"{}\", vec![1, 2, 3].iter().sum::<i32>()); }",
    "你好，世界！今天天气很好。",
    "机器学习是人工智能的一个分支。",
    "Emoji: 🎉🚀👍🏽 and flags 🇯🇵 family 👨‍👩‍👧",
    "Mixed: naïve café, Ελληνικά, русский, العربية, 日本語のテキスト",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "   leading spaces and trailing   ",
]

CONVERSATIONS = [
    ([{"role": "user", "content": "Why is the sky blue?"}], None),
    ([{"role": "user", "content": "Why is the sky blue?"}], False),
    (
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three primes."},
        ],
        None,
    ),
    (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nEasy sum.\n</think>\n\n2+2 = 4."},
            {"role": "user", "content": "And 3+3? 用中文回答。"},
        ],
        False,
    ),
]


def main(model_dir: str) -> None:
    out = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TEXTS]
    (out / "tokenizer_ids.json").write_text(json.dumps(ids, ensure_ascii=False, indent=1) + "\n")
    chats = []
    for messages, thinking in CONVERSATIONS:
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        chats.append({"messages": messages, "enable_thinking": thinking, "rendered": text})
    (out / "chat_template.json").write_text(json.dumps(chats, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(ids)} tokenizer cases and {len(chats)} chat cases to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/models/qwen3-0.6b")
