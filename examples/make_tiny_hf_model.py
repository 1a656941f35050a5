"""Make a small local Hugging Face-format Llama to fine-tune with examples/hf-finetune.yaml.

Nothing is downloaded: a byte-level BPE tokenizer (BOS added in front, as Llama 3's) is trained
with the `tokenizers` library on disttrain's bundled corpus, and a Llama 3-style model (llama3
RoPE scaling, grouped-query attention) with random weights is built from
`transformers.LlamaConfig`. Writes OUT/ with config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json and special_tokens_map.json.

Usage: python examples/make_tiny_hf_model.py [--out examples/tiny-hf-model] [--seed 0]
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

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
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny-hf-model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = make_tokenizer(corpus_documents())
    model = make_model(tokenizer, args.seed)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)})")


if __name__ == "__main__":
    main()
