"""Hugging Face models in and out, checked against transformers itself (nothing downloaded).

Small random models are built from transformers' config classes and `save_pretrained`; disttrain
loads them through `model.hf`. Checked: logits equal transformers' forward; 3 training steps
through disttrain's trainer equal 3 steps of plain transformers + torch AdamW on the same
batches; the exported checkpoint reloads in transformers with equal logits (also from a 2-rank
ZeRO-3 run); sharded safetensors; bad inputs refused naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from conftest import run_cli
from disttrain.hf_export import export_hf
from disttrain.model import build_model
from disttrain.data.documents import load_tokenizer
from disttrain.model.hf import load_hf_weights
from disttrain.parallel.spawn import spawn_ranks
from disttrain.planning import fixed_plan
from disttrain.spec import SpecError, job_from_dict
from disttrain.trainer import Trainer
from planner.plan import Plan

SEQ, VOCAB, STEPS, LR = 32, 300, 3, 1e-3
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # wavelengths 2pi..~1e5: all three regimes
FAMILIES = {
    "llama3": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_theta=500000.0,
                                                   rope_scaling=LLAMA3)),
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, rope_theta=1e6)),
    # head_dim 24 != 64 / 4 (Mistral-NeMo's kind: q 96 wide against hidden 64)
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=SEQ,
                                                        head_dim=24)),
    # Qwen3: per-head q/k RMSNorm, head_dim 24
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=24, rope_theta=1e6)),
}


def make_hf_dir(path: Path, family: str, seed: int = 0, **save_kwargs) -> Path:
    """A random HF model of `family` saved in `path`; norm weights and biases randomised too
    (HF initialises them to 1 and 0, which would hide a mix-up)."""
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if name.endswith("bias") else 1.0))
    model.save_pretrained(path, **save_kwargs)
    return path


def write_tokenizer(path: Path) -> None:
    """A tiny byte-level BPE tokenizer (trained here) saved as HF tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["long sequences of tokens train slowly"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def spec(hf_dir: Path, out: Path, **changes) -> dict:
    train = {"seq_len": SEQ, "micro_batch_size": 1, "global_batch_size": 2, "steps": STEPS,
             "lr": LR, "min_lr": LR, "warmup_steps": 0, "grad_clip": 0.0, "weight_decay": 0.1,
             "checkpoint_every": 0, "seed": 3, **changes.pop("train", {})}
    return {"name": "hf", "model": {"hf": str(hf_dir)}, "train": train,
            "data": {"kind": "synthetic"}, "output_dir": str(out), **changes}


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(tmp_path, family):
    hf_dir = make_hf_dir(tmp_path / "hf", family)
    job = job_from_dict(spec(hf_dir, tmp_path / "run"))
    ours = build_model(job.shape)
    load_hf_weights(ours, hf_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    torch.testing.assert_close(logits_of(ours, TOKENS), logits_of(theirs, TOKENS),
                               rtol=0, atol=1e-5)
    if family == "llama3":  # the scaling is live: unscaled RoPE gives other logits
        plain = build_model(job.shape.replace(rope_scaling="none"))
        load_hf_weights(plain, hf_dir)
        assert (logits_of(plain, TOKENS) - logits_of(theirs, TOKENS)).abs().max() > 1e-3


def test_sharded_index_loads(tmp_path):
    hf_dir = make_hf_dir(tmp_path / "hf", "qwen2", max_shard_size="40KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    assert len(list(hf_dir.glob("*.safetensors"))) > 2
    job = job_from_dict(spec(hf_dir, tmp_path / "run"))
    ours = build_model(job.shape)
    load_hf_weights(ours, hf_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    torch.testing.assert_close(logits_of(ours, TOKENS), logits_of(theirs, TOKENS),
                               rtol=0, atol=1e-5)


def reference_losses(hf_dir: Path, trainer: Trainer) -> list[float]:
    """STEPS steps of plain transformers + torch AdamW on the trainer's own batches, with the
    trainer's settings: betas (0.9, 0.95), eps 1e-8, decay on matrices only, constant lr."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    accum, losses = trainer.runtime.accum_steps, []
    for step in range(STEPS):
        total = 0.0
        for micro in range(accum):
            tokens, targets = trainer.batches.get(step, micro)
            logits = model(tokens).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / accum
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


@pytest.mark.parametrize("family", FAMILIES)
def test_training_matches_transformers_and_export_reloads(tmp_path, family):
    hf_dir = make_hf_dir(tmp_path / "hf", family)
    write_tokenizer(hf_dir)
    trainer = Trainer(job_from_dict(spec(hf_dir, tmp_path / "run")))
    assert trainer.runtime.accum_steps == 2
    losses = trainer.run().losses
    assert losses == pytest.approx(reference_losses(hf_dir, trainer), abs=1e-5, rel=0)
    assert losses[-1] < losses[0]

    out = tmp_path / "export"
    result = export_hf(tmp_path / "run", out)
    assert "tokenizer.json" in result.copied
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits_of(reloaded, TOKENS), logits_of(trainer.model, TOKENS),
                               rtol=0, atol=1e-5)
    source = json.loads((hf_dir / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in exported.items() if k != "dtype"} == \
        {k: v for k, v in source.items() if k != "dtype"}
    tied = family == "llama-tied"
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied
    assert load_tokenizer(out).encode(["long sequences"]) == load_tokenizer(hf_dir).encode(
        ["long sequences"])


def test_export_of_a_preset_run_is_a_llama(tmp_path, write_spec):
    run = tmp_path / "preset"
    raw = {"name": "p", "model": {"preset": "tiny"}, "output_dir": str(run),
           "train": {"seq_len": 32, "steps": 1, "checkpoint_every": 0}}
    trainer = Trainer(job_from_dict(raw))
    trainer.run()
    done = run_cli("export", run, "--hf", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    tokens = TOKENS % 259
    torch.testing.assert_close(logits_of(reloaded, tokens), logits_of(trainer.model, tokens),
                               rtol=0, atol=1e-5)
    bad = run_cli("export", run, "--step", "5", "--hf", tmp_path / "out2")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --step:"), bad.stderr

    export_hf(run, tmp_path / "bf16", dtype="bf16")  # weights rounded once, config says so
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.model.embed_tokens.weight,
                               trainer.model.embed.weight.detach().bfloat16(), rtol=0, atol=0)


def test_bf16_checkpoint_loads_into_fp32_master_weights(tmp_path):
    hf_dir = tmp_path / "hf"
    make_hf_dir(tmp_path / "fp32", "mistral")
    AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").to(torch.bfloat16).save_pretrained(
        hf_dir)
    job = job_from_dict(spec(hf_dir, tmp_path / "run"))
    ours = build_model(job.shape)
    load_hf_weights(ours, hf_dir)
    assert ours.embed.weight.dtype == torch.float32
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(ours, TOKENS), logits_of(theirs, TOKENS),
                               rtol=0, atol=1e-5)


def test_plan_uses_the_shape_of_the_config(tmp_path):
    from planner.search import plan_job

    hf_dir = make_hf_dir(tmp_path / "hf", "qwen2")
    job = job_from_dict(spec(hf_dir, tmp_path / "run"))
    assert job.shape.qkv_bias and job.shape.rope_theta == 1e6 and job.shape.max_seq_len == 128
    plan = plan_job(job.plan_request())
    assert plan.feasible and plan.model == job.shape.to_dict()
    hf_params = AutoModelForCausalLM.from_pretrained(hf_dir).num_parameters()
    assert job.shape.num_params() == hf_params == sum(
        p.numel() for p in build_model(job.shape).parameters())


def test_shape_options_round_trip_and_stay_out_of_plain_shapes():
    from planner.shapes import MODEL_PRESETS, ModelShape

    tiny = MODEL_PRESETS["tiny"]
    assert "qkv_bias" not in tiny.to_dict() and "rope_scaling" not in tiny.to_dict()
    shape = tiny.replace(qkv_bias=True, rope_scaling="llama3", rope_scaling_factor=8.0,
                         rope_original_max_seq_len=512)
    assert ModelShape(**json.loads(json.dumps(shape.to_dict()))) == shape
    with pytest.raises(ValueError, match="rope_scaling: must be 'none' or 'llama3'"):
        tiny.replace(rope_scaling="yarn")
    with pytest.raises(ValueError, match="rope_scaling: llama3 needs"):
        tiny.replace(rope_scaling="llama3")


def _edit_config(hf_dir: Path, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


BAD = {  # name: (family, how to break it, spec changes, expected message start)
    "no-config": ("llama3", lambda d: (d / "config.json").unlink(), {}, "model.hf: .* no config"),
    "no-weights": ("llama3", lambda d: (d / "model.safetensors").unlink(), {},
                   r"model.hf: .* no \*.safetensors"),
    "shape-mismatch": ("llama3", lambda d: _edit_config(d, intermediate_size=100), {},
                       r"model.hf: model.layers.0.mlp.gate_proj.weight .* has shape \[96, 64\] "
                       r"but config.json implies \[100, 64\]"),
    "unknown-arch": ("llama3", lambda d: _edit_config(d, model_type="gpt2"), {},
                     "model.hf: config.json model_type 'gpt2' is not supported; supported: llama"),
    "rope-yarn": ("llama3", lambda d: _edit_config(d, rope_scaling={"rope_type": "yarn",
                                                                    "factor": 4.0}), {},
                  "model.hf: config.json rope_scaling.rope_type = 'yarn' is not supported"),
    "gelu": ("qwen2", lambda d: _edit_config(d, hidden_act="gelu"), {},
             "model.hf: config.json hidden_act = 'gelu' is not supported; supported: 'silu'"),
    "llama-bias": ("llama-tied", lambda d: _edit_config(d, attention_bias=True), {},
                   "model.hf: config.json attention_bias = True is not supported"),
    "window": ("mistral", lambda d: None, {"train": {"seq_len": 64}},
               r"model.hf: config.json sliding_window = 32 is shorter than train.seq_len \(64\)"),
    "too-long": ("qwen2", lambda d: None, {"train": {"seq_len": 256}},
                 r"train.seq_len: 256 exceeds max_position_embeddings \(128\)"),
    "with-preset": ("qwen2", lambda d: None, {"model": {"preset": "tiny"}},
                    "model.preset: not allowed with model.hf"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_name_the_field(tmp_path, case):
    family, breaks, changes, message = BAD[case]
    hf_dir = make_hf_dir(tmp_path / "hf", family)
    breaks(hf_dir)
    raw = spec(hf_dir, tmp_path / "run", **changes)
    if "model" in changes:
        raw["model"] = {"hf": str(hf_dir), **changes["model"]}
    with pytest.raises(SpecError, match=message):
        job_from_dict(raw)


def test_llama3_beyond_max_positions_warns(tmp_path, capsys):
    hf_dir = make_hf_dir(tmp_path / "hf", "llama3")
    job = job_from_dict(spec(hf_dir, tmp_path / "run", train={"seq_len": 256}))
    assert job.shape.rope_scaling == "llama3"
    assert "warning: train.seq_len 256 exceeds max_position_embeddings" in capsys.readouterr().err


def test_cli_exits_2_with_one_line(tmp_path, write_spec):
    hf_dir = make_hf_dir(tmp_path / "hf", "llama-tied")
    _edit_config(hf_dir, model_type="gpt2")
    done = run_cli("check", write_spec(raw=spec(hf_dir, tmp_path / "run")))
    assert done.returncode == 2
    assert done.stderr.startswith("error: model.hf: config.json model_type 'gpt2'"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_tokenizer_loads_local_files_and_refuses_a_dir_without_them(tmp_path):
    hf_dir = make_hf_dir(tmp_path / "hf", "llama3")
    with pytest.raises(SpecError, match="model.hf: .* holds no tokenizer files"):
        load_tokenizer(hf_dir, field="model.hf")
    write_tokenizer(hf_dir)
    tok = load_tokenizer(hf_dir)
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    text = "long sequences of tokens"
    # documents end with EOS: transformers' ids (BOS first) then EOS
    assert tok.encode([text]) == [theirs(text)["input_ids"] + [theirs.eos_token_id]]
    assert tok.eos_id == theirs.eos_token_id and tok.bos_id == theirs.bos_token_id
    assert tok.vocab_size == len(theirs) and len(tok.fingerprint) == 64


def _zero3_worker(rank, world, raw, plan_dict):
    trainer = Trainer(job_from_dict(raw), Plan.from_dict(plan_dict))
    losses = trainer.run().losses
    return losses, trainer.runtime.states.full_state_dict()


@pytest.mark.slow
def test_zero3_two_rank_run_exports_to_transformers(tmp_path):
    hf_dir = make_hf_dir(tmp_path / "hf", "qwen2")
    raw = spec(hf_dir, tmp_path / "run", cluster={"devices_per_node": 2},
               parallel={"dp": 2, "sp": 1, "pp": 1, "zero_stage": 3},
               launch={"launcher": "torchrun"})
    job = job_from_dict(raw)
    plan = fixed_plan(job, 2)
    assert plan.parallel.zero_stage == 3 and plan.parallel.dp == 2
    (losses, full), _ = spawn_ranks(_zero3_worker, 2, raw, plan.to_dict())
    assert len(losses) == STEPS
    export_hf(tmp_path / "run", tmp_path / "out")
    ours = build_model(job.shape)
    ours.load_state_dict(full)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits_of(reloaded, TOKENS), logits_of(ours, TOKENS),
                               rtol=0, atol=1e-5)


def _example_worker(rank, world, raw, base_dir, plan_dict):
    trainer = Trainer(job_from_dict(raw, base_dir=Path(base_dir)), Plan.from_dict(plan_dict))
    trainer.run()
    return trainer.runtime.states.full_state_dict()


@pytest.mark.slow
def test_example_makes_a_model_that_fine_tunes_with_a_swapping_plan_and_exports(tmp_path,
                                                                              tiny_hf_model):
    """examples/: make the model (the session's run of examples/make_tiny_hf_model.py), plan
    (not everything kept), train on 2 ranks (sp 2 ring, packed documents), export, reload in
    transformers."""
    import yaml

    from conftest import ROOT
    from disttrain.planning import resolve_plan

    example = ROOT / "examples"
    raw = yaml.safe_load((example / "hf-finetune.yaml").read_text())
    raw["model"]["hf"] = str(tiny_hf_model)
    raw["train"].update(steps=2, checkpoint_every=0)
    raw["output_dir"] = str(tmp_path / "run")
    job = job_from_dict(raw, base_dir=example)
    assert job.shape.rope_scaling == "llama3" and job.hf.family == "llama"
    tok = load_tokenizer(job.hf.path)
    assert job.shape.vocab_size == tok.vocab_size and tok.encode(["a"])[0][0] == tok.bos_id
    plan = resolve_plan(job, 2)
    assert plan.parallel.sp == 2 and not all(a.keep_all for a in plan.activations)
    full, _ = spawn_ranks(_example_worker, 2, raw, str(example), plan.to_dict())
    export_hf(tmp_path / "run", tmp_path / "out")
    ours = build_model(job.shape)
    ours.load_state_dict(full)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = TOKENS % job.shape.vocab_size
    torch.testing.assert_close(logits_of(reloaded, tokens), logits_of(ours, tokens),
                               rtol=0, atol=1e-5)


def _losses_worker(rank, world, raw, plan_dict):
    return Trainer(job_from_dict(raw), Plan.from_dict(plan_dict)).run().losses


@pytest.mark.slow
@pytest.mark.parametrize("family,parallel", [
    ("llama3", {"dp": 1, "sp": 1, "pp": 2, "zero_stage": 1}),  # the stages' own RoPE tables
    ("qwen2", {"dp": 1, "sp": 2, "pp": 1, "sp_kind": "ring", "zero_stage": 2}),  # q/k/v biases
], ids=["pp2-llama3", "sp2-ring-qwen2"])
def test_hf_model_under_pp_and_sp_matches_single_process(tmp_path, family, parallel):
    hf_dir = make_hf_dir(tmp_path / "hf", family)
    single = Trainer(job_from_dict(spec(hf_dir, tmp_path / "ref")))
    reference = single.run().losses
    raw = spec(hf_dir, tmp_path / "par", cluster={"devices_per_node": 2}, parallel=parallel,
               launch={"launcher": "torchrun"})
    plan = fixed_plan(job_from_dict(raw), 2)
    for losses in spawn_ranks(_losses_worker, 2, raw, plan.to_dict()):
        assert losses == pytest.approx(reference, rel=1e-5, abs=0)
    export_hf(tmp_path / "par", tmp_path / "out")  # the pipeline / sequence-parallel checkpoint
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits_of(reloaded, TOKENS), logits_of(single.model, TOKENS),
                               rtol=0, atol=1e-4)  # fp32 reduction order of the parallel run
