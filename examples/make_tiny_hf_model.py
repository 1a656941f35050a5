"""Make a small local Hugging Face-format Llama to fine-tune with examples/hf-finetune.yaml.

Nothing is downloaded: a byte-level BPE tokenizer is trained with the `tokenizers` library on
disttrain's bundled corpus, and a Llama 3-style model (llama3 RoPE scaling, grouped-query
attention) with random weights is built from `transformers.LlamaConfig`. Writes

    OUT/model/       config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...
    OUT/tokens.npy   the corpus tokenized with that tokenizer (paragraphs joined by EOS)

Usage: python examples/make_tiny_hf_model.py [--out examples/tiny-hf] [--seed 0]
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
VOCAB = 512


def corpus_documents() -> list[str]:
    text = resources.files("disttrain.data").joinpath("corpus.txt").read_text("utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def make_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(  # BOS first, as Llama 3's tokenizer
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def make_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny-hf")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    docs = corpus_documents()
    tokenizer = make_tokenizer(docs)
    model = make_model(tokenizer, args.seed)
    model_dir = args.out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ids = [i for doc in docs for i in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
    np.save(args.out / "tokens.npy", np.asarray(ids, dtype=np.int32))
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {model_dir} ({params / 1e6:.2f}M params, vocab {len(tokenizer)}) and "
          f"{args.out / 'tokens.npy'} ({len(ids)} tokens)")


if __name__ == "__main__":
    main()
