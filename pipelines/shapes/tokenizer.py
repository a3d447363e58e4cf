"""Word-level tokenizer of the ``shapes-wan`` models, in the style of Wan's T5 tokenizer.

Lowercases, turns anything that is not a letter into a space, splits at spaces, maps each
word of the grammar (``gen.pipelines.shapes.grammar.WORDS``) to its id and any other word
to ``<unk>``, and appends ``</s>``; pads with ``<pad>`` (id 0) on the right, as the
pipeline's ``padding="max_length"`` call expects. It is saved with the model
(``tokenizer/tokenizer.json``) and loaded back by ``WanPipeline.from_pretrained`` like a
real checkpoint's tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .grammar import WORDS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIALS", "build_shapes_tokenizer", "shapes_vocabulary"]

SPECIALS: tuple[str, ...] = ("<pad>", "</s>", "<unk>")


def shapes_vocabulary() -> dict[str, int]:
    """``{token: id}``: the three special tokens (ids 0, 1, 2), then ``WORDS`` in order."""
    return {tok: i for i, tok in enumerate((*SPECIALS, *WORDS))}


def build_shapes_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """The tokenizer as a ``PreTrainedTokenizerFast`` (pad ``<pad>``, eos ``</s>``, unk ``<unk>``)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab=shapes_vocabulary(), unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^a-z\s]+"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, padding_side="right",
        truncation_side="right", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
    )
