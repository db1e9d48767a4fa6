"""A tokenizer test corpus: >= 300 strings over the cases that break tokenizers."""

import random

HANDWRITTEN = [
    "Hello world", "hello", " leading space", "trailing space ", "", " ", "   ", "\n", "\n\n\n", "\t\t",
    "  many   spaces\n\n\ttabs", "x\r\ny", " \n0", "  1", "a" * 200, " " * 64 + "x", "\n" * 10 + "end",
    # numbers
    "2024", " 2024 is 12345 years", "3.14159", "1,000,000.50", "-42", "1e-10", "0x1F", "٣٤٥ arabic digits",
    "१२३ devanagari", "½ ² ³", "v1.2.3-rc4",
    # unicode
    "ÀÉÎÕÜ café naïve", "Straße", "İstanbul", "ǅ", "\u00a0nbsp\u00a0", "zero\u200bwidth", "e\u0301 combining",
    "Ελληνικά", "Русский текст", "עברית", "العربية", "हिन्दी", "ไทย", "한국어 텍스트", "Tiếng Việt",
    # CJK
    "日本語のテキスト", "中文测试，标点。", "漢字かなカナ", "你好，世界！", "ｆｕｌｌｗｉｄｔｈ",
    # emoji
    "emoji 😀👍🏽 ok", "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "❤️‍🔥", "🤖" * 5,
    # code
    "def f(x):\n    return x**2  # square", "for (int i = 0; i < n; ++i) { a[i] = i; }",
    "<html><body class=\"x\">hi</body></html>", "SELECT * FROM t WHERE a='b';", "$ ls -la | grep '\\.py$'",
    "{\"key\": [1, 2, {\"nested\": null}]}", "x = y if z else w  # ternary", "    indented\n        more",
    "https://example.com/path?query=1&b=2#frag", "user@example.com",
    # contractions and punctuation
    "I'm you'll they've she'd we're it's", "WAIT!!! what??? ...", "«quotes» “curly” ‘single’", "a—b–c",
    # special-token text
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<|im_end|><|im_end|>", "text <|im_start|> text",
    "<|im_start", "im_end|>", "<s></s>", "<unk>",
]

ALPHABET = "abc XYZ 0123456789\n\t.,;!?日本😀é'\"<>|_-ßЖ"


def corpus(n_random: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(HANDWRITTEN)
    for _ in range(n_random):
        out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 48))))
    return out
