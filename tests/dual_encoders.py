"""Tiny random dual encoders for tests: CLIP, SigLIP and SigLIP 2 folders that load with AutoModel/AutoProcessor.

Each builds in about a second from a config (random weights) and a tokenizer
trained here on the synthetic captions, so tests exercise the real model and
processor classes without any download.

* CLIP: ``CLIPModel`` + ``CLIPProcessor`` (the embedded tiny-clip's tokenizer and
  PIL image processor, untrained weights).
* SigLIP: ``SiglipModel`` + ``SiglipProcessor``. Real SigLIP checkpoints ship a
  sentencepiece ``SiglipTokenizer``, which needs the ``sentencepiece`` package;
  ``tokenizer="sentencepiece"`` builds one of those (trained with sentencepiece),
  the default a tokenizers-backed Unigram tokenizer that behaves alike (appends
  ``</s>``, pads with it) and needs nothing extra.
* SigLIP 2: ``Siglip2Model`` + ``Siglip2Processor`` with the NaFlex PIL image
  processor (variable resolution, ``pixel_attention_mask`` + ``spatial_shapes``)
  and a ``Siglip2Tokenizer`` (Gemma-style BPE, tokenizers-backed).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    PreTrainedTokenizerFast,
    Siglip2Config,
    Siglip2ImageProcessorPil,
    Siglip2Model,
    Siglip2Processor,
    Siglip2Tokenizer,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
)

from finetune.demo import synthetic, tiny_clip

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TEXT_LENGTH = 32  # SigLIP pads every text to this length and pools the last position
IMAGE_SIZE, PATCH_SIZE = 32, 8


def corpus(n: int = 200) -> list[str]:
    return [scene.caption() for scene in synthetic.make_scenes(n, seed=4321)]


def build_clip(out_dir: str | os.PathLike) -> Path:
    """A random-weight CLIPModel with tiny-clip's processor."""
    processor = tiny_clip.build_processor()
    model = tiny_clip.build_model(processor.tokenizer)
    return _save(out_dir, model, processor)


def build_siglip(out_dir: str | os.PathLike, tokenizer: str = "fast") -> Path:
    """A random-weight SiglipModel + SiglipProcessor; ``tokenizer="sentencepiece"`` for a real SiglipTokenizer."""
    tok = _sentencepiece_tokenizer(out_dir) if tokenizer == "sentencepiece" else _unigram_tokenizer()
    config = SiglipConfig(
        text_config={**TOWER, "vocab_size": len(tok), "max_position_embeddings": TEXT_LENGTH,
                     "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": None},
        vision_config={**TOWER, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
    )  # fmt: skip
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return _save(out_dir, SiglipModel(config), SiglipProcessor(image_processor=image_processor, tokenizer=tok))


def build_siglip2(out_dir: str | os.PathLike) -> Path:
    """A random-weight Siglip2Model + Siglip2Processor (NaFlex).

    Siglip2Processor's class defaults (texts padded to 64 tokens, images cut into
    at most 256 patches of 16 px) override what the tokenizer and the image
    processor were saved with, so the tiny model is sized for them.
    """
    tok = _gemma_tokenizer()
    config = Siglip2Config(
        text_config={**TOWER, "vocab_size": len(tok), "max_position_embeddings": 64,
                     "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id},
        vision_config={**TOWER, "num_patches": 256, "patch_size": 16},
    )  # fmt: skip
    image_processor = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256)
    return _save(out_dir, Siglip2Model(config), Siglip2Processor(image_processor=image_processor, tokenizer=tok))


def _save(out_dir, model, processor) -> Path:
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _unigram_tokenizer() -> PreTrainedTokenizerFast:
    """Sentencepiece-style Unigram (Metaspace, lower-cased) with ``</s>`` appended, as SiglipTokenizer does."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)  # fmt: skip
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>",
                                   model_max_length=TEXT_LENGTH)  # fmt: skip


def _sentencepiece_tokenizer(out_dir) -> PreTrainedTokenizerFast:
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=100, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "spiece.model"
    path.write_bytes(model.getvalue())
    return SiglipTokenizer(vocab_file=str(path), model_max_length=TEXT_LENGTH)


def _gemma_tokenizer() -> Siglip2Tokenizer:
    """Siglip2Tokenizer's own pipeline with a BPE vocabulary trained on the captions."""
    empty = Siglip2Tokenizer()
    trained = empty.train_new_from_iterator(corpus(), vocab_size=200, show_progress=False)
    trained.model_max_length = 64
    return trained
