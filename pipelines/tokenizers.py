"""Offline tokenizers for the tiny pipelines: no hub, no files to fetch.

One fixed vocabulary (special tokens, a few hundred common English words, digits and
punctuation) behind a word-level ``tokenizers.Tokenizer``, wrapped as
``transformers.PreTrainedTokenizerFast`` in three flavours that add the special tokens
the way each real tokenizer does:

- ``"t5"`` (Wan's UMT5, FLUX's T5): ``words </s>``, pad ``<pad>`` (id 0), eos ``</s>`` (id 1).
- ``"llama"`` (HunyuanVideo's Llama): ``<|begin_of_text|> words``, right padding, and
  the header / ``<|eot_id|>`` tokens of HunyuanVideo's prompt template.
- ``"clip"`` (FLUX / HunyuanVideo CLIP): ``<|startoftext|> words <|endoftext|>``,
  padded with ``<|endoftext|>``, 77 tokens.

Pre-tokenization follows Llama 3's split (words keep one leading space, digits stand
alone, ``\\n\\n`` is one token, a space before a digit is its own token), so
HunyuanVideo's default prompt template is exactly ``crop_start`` = 95 tokens long up to
the user prompt and the pipeline's hard-coded crop lands on the prompt's first word.
Unknown words map to ``<unk>``. Everything is built in memory and deterministic: the
same ids (and, when saved, the same files) on every call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "TOKENIZER_STYLES",
    "VOCAB_SIZE",
    "TokenizerStyle",
    "build_tokenizer",
    "special_token_ids",
    "vocabulary",
]

TokenizerStyle = Literal["t5", "llama", "clip"]
TOKENIZER_STYLES: tuple[str, ...] = ("t5", "llama", "clip")

# Fixed ids 0..9 for every style, so the encoder configs can name them as constants.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",  # 0: T5 pad
    "</s>",  # 1: T5 eos
    "<unk>",  # 2: unknown word, all styles
    "<|begin_of_text|>",  # 3: Llama bos
    "<|end_of_text|>",  # 4: Llama eos and pad
    "<|start_header_id|>",  # 5: HunyuanVideo template
    "<|end_header_id|>",  # 6
    "<|eot_id|>",  # 7
    "<|startoftext|>",  # 8: CLIP bos
    "<|endoftext|>",  # 9: CLIP eos and pad
)

# Common English words (no hyphens: the pre-tokenizer splits at "-"): every word of HunyuanVideo's default template (so the template
# never turns into <unk>) and the usual prompt vocabulary (colours, things, motion,
# camera, light). Order is part of the id table: append, never reorder.
_WORDS: tuple[str, ...] = tuple(
    """
    a an the and or but of in on at to from by with without for into onto over under
    above below behind beside between near far through across around along up down
    out off is are was were be been being it its this that these those there here
    he she they we you i his her their our your my me him them what which who how
    when where while as than then so very too more most less few many much some any
    all each every no not one two three four five six seven eight nine ten first
    second last next other same new old big small large little tiny huge tall short
    long wide narrow high low bright dark light heavy soft hard hot cold warm cool
    fast slow quick quiet loud happy sad calm wild beautiful cute pretty strange
    red orange yellow green blue purple pink brown black white gray grey golden silver
    color colors shape size texture quantity text spatial relationships objects object
    actions action events event behaviors behavior temporal physical movement movements
    changes change background environment style atmosphere camera angles angle
    transitions transition used use describe detailing following aspects main content
    theme video videos image picture scene system user view shot frame frames
    man woman person people child children boy girl baby family friend crowd face
    hand hands eyes hair dog dogs cat cats bird birds fish horse cow sheep rabbit bear
    lion tiger fox wolf deer duck butterfly dragon robot car cars bus train truck bike
    boat ship plane airplane rocket ball balls box cup bottle table chair bed door
    window house home room kitchen street road city town building tower bridge park
    garden forest tree trees flower flowers grass leaf leaves mountain mountains hill
    river lake sea ocean beach wave waves water rain snow ice fire smoke cloud clouds
    sky sun moon star stars night day morning evening sunset sunrise winter summer
    spring autumn field desert island space planet earth world food cake apple
    fruit coffee tea book paper music guitar piano game toy hat dress shirt coat
    walk walks walking run runs running jump jumps jumping fly flies flying swim swims
    swimming dance dances dancing sit sits sitting stand stands standing play plays
    playing eat eats eating drink look looks looking move moves moving turn turns
    turning roll rolls rolling fall falls falling float floats floating spin spins
    spinning drive drives driving ride rides riding smile smiles smiling talk talks
    sing sings hold holds holding open close bounce bounces bouncing glow glows glowing
    zoom pan tilt slowly quickly gently closeup aerial cinematic
    realistic photorealistic detailed sharp blurry focus lighting shadow shadows
    reflection painting drawing cartoon anime film movie quality
    resolution dramatic vivid colorful peaceful stormy foggy sunny snowy rainy
    """.split()
)

_DIGITS: tuple[str, ...] = tuple("0123456789")
_PUNCT: tuple[str, ...] = tuple(".,:;!?'\"()-/&")
# Byte-level spellings: a leading space is "Ġ", a newline "Ċ" (as in GPT-2/Llama 3 files).
_SPACE, _NEWLINE = "\u0120", "\u010a"
_WHITESPACE: tuple[str, ...] = (_SPACE, _NEWLINE, _NEWLINE * 2, _SPACE * 2)

# Llama 3's pre-tokenization regex (without the 1-3 digit grouping: digits stand alone so
# that any number stays within the fixed vocabulary).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def vocabulary() -> dict[str, int]:
    """The fixed token -> id table shared by all styles (``VOCAB_SIZE`` entries).

    Ids 0-9 are ``SPECIAL_TOKENS``; then each word and punctuation mark twice (bare and
    with a leading space, byte-level spelled), digits, and whitespace runs.
    """
    tokens: list[str] = list(SPECIAL_TOKENS)
    seen: set[str] = set(tokens)
    for piece in (*_WORDS, *_PUNCT):
        for tok in (piece, _SPACE + piece):
            if tok not in seen:
                seen.add(tok)
                tokens.append(tok)
    for tok in (*_DIGITS, *_WHITESPACE):
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
    return {tok: i for i, tok in enumerate(tokens)}


VOCAB_SIZE: int = len(vocabulary())
"""Entries in the shared vocabulary; the tiny encoders' ``vocab_size`` must be >= this."""


def special_token_ids() -> dict[str, int]:
    """``{token: id}`` of the special tokens (the same ids in every style)."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}


def _backend(style: str) -> Tokenizer:
    ids = special_token_ids()
    tok = Tokenizer(WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    # Lowercase: the vocabulary is lowercase, and "The" should not become <unk>.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    if style == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", ids["</s>"])]
        )
    elif style == "llama":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])]
        )
    else:  # clip
        bos, eos = "<|startoftext|>", "<|endoftext|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            pair=f"{bos} $A {eos} $B {eos}",
            special_tokens=[(bos, ids[bos]), (eos, ids[eos])],
        )
    return tok


def build_tokenizer(style: TokenizerStyle, *, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over the fixed vocabulary, special tokens as ``style`` wants.

    Args:
        style: ``"t5"``, ``"llama"`` or ``"clip"`` (see the module docstring).
        model_max_length: longest sequence in tokens; default 512 (t5), 1024 (llama), 77 (clip).

    Works with what the pipelines call: ``tokenizer(prompts, padding="max_length",
    max_length=..., truncation=True, return_attention_mask=True, return_tensors="pt")``,
    ``padding="longest"`` and ``batch_decode``. Padding is on the right for every style
    (HunyuanVideo's transformer counts valid text tokens from the left).
    """
    # Imported here: transformers is slow to import and most users of this module never
    # build a tokenizer.
    from transformers import PreTrainedTokenizerFast

    if style not in TOKENIZER_STYLES:
        raise ValueError(f"Unknown tokenizer style {style!r}; choose one of {', '.join(TOKENIZER_STYLES)}.")
    if style == "t5":
        specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        default_len, extra = 512, []
    elif style == "llama":
        specials = {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "pad_token": "<|end_of_text|>",
            "unk_token": "<unk>",
        }
        default_len, extra = 1024, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    else:
        specials = {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<unk>",
        }
        default_len, extra = 77, []
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_backend(style),
        model_max_length=model_max_length or default_len,
        padding_side="right",
        truncation_side="right",
        additional_special_tokens=extra,
        **specials,
    )
    return tokenizer
