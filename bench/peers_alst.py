"""DeepSpeed's long-sequence recipe (ALST, DeepSpeed 0.19.8) as a peer of bench/peers.py.

Wired as `deepspeed/runtime/sequence_parallel/ulysses_sp.py` intends, on the same model and
data as every other peer (disttrain's seeded weights copied into an HF `LlamaForCausalLM`):

  * ZeRO-3 (no offload: DeepSpeed's CPU backend and this node's CPU are the same RAM), torch
    AdamW with the peers' betas/eps, clipping at 1.0;
  * `UlyssesSPAttentionHF.register_with_transformers(...)` over HF's `sdpa` attention at sp > 1
    (its mpu passed to `deepspeed.initialize`); each rank takes its shard of every global
    sequence, as `UlyssesSPDataLoaderAdapter` would hand it out;
  * `TiledMLP` for every decoder MLP and `TiledFusedLogitsLoss` for head + loss, both in
    `TILE_TOKENS`-token tiles (ALST's defaults suit 4096-wide models; 1024 measured best here);
  * HF gradient checkpointing of every decoder layer (non-reentrant).

Measured facts the wiring depends on (see the issue and docs/benchmarks.md):
  * `TiledFusedLogitsLoss` computes lm_head's gradient inside its forward, so a loss scale
    applied afterwards (the engine's 1/gradient-accumulation) never reaches it: the scale is
    inside the loss function (a token-weighted mean over the global batch) and
    `engine.backward(loss, scale_wrt_gas=False)`.
  * ZeRO-3 averages gradients over the whole dp x sp group (at sp2 its reported gradient norm
    is half the true one when each rank weights its tokens by dp / (batch x seq_len)): each
    rank's loss weight is world / (batch x seq_len), after which the gradient norms of every
    step equal plain PyTorch's and disttrain's.
  * The body and the loss run inside the engine's forward (`_AlstLM.forward`); called outside
    it, ZeRO-3's parameter schedule never settles.
  * transformers 4.57 builds a full S x S mask at sp1: at sp1 the mask is dropped as ALST's own
    wrapper drops it at sp > 1 (causal attention needs none).
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

TILE_TOKENS = 1024
"""Tokens per TiledMLP / TiledFusedLogitsLoss tile."""


def hf_llama(shape: dict, seed: int):
    """An HF LlamaForCausalLM (sdpa attention, fp32) holding disttrain's seeded weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from disttrain.model import build_model
    from planner.shapes import ModelShape

    ms = ModelShape(**shape)
    config = LlamaConfig(vocab_size=ms.vocab_size, hidden_size=ms.hidden_size,
                         intermediate_size=ms.ffn_hidden_size, num_hidden_layers=ms.num_layers,
                         num_attention_heads=ms.num_heads, num_key_value_heads=ms.num_kv_heads,
                         max_position_embeddings=ms.max_seq_len, rms_norm_eps=ms.norm_eps,
                         rope_theta=ms.rope_theta, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, torch_dtype=torch.float32,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    ours = build_model(ms, seed=seed)
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    parts = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "attn": "self_attn", "mlp": "mlp"}
    state = {}
    for name, tensor in ours.state_dict().items():
        if name not in names:  # layers.{i}.{part}.{rest}
            _, index, part, *rest = name.split(".")
            names[name] = ".".join(["model.layers", index, parts[part], *rest])
        state[names[name]] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"weight mapping: missing {missing}, unexpected {unexpected}")
    return model


def _tiled_mlp_forward(self, x):
    """LlamaMLP.forward through DeepSpeed's TiledMLP (tiles agreed across ranks)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = torch.tensor(math.ceil(x.shape[-2] / TILE_TOKENS))
    dist.all_reduce(shards, op=dist.ReduceOp.MAX)
    params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]

    def mlp(module, x_tile):
        return module.down_proj(module.act_fn(module.gate_proj(x_tile)) * module.up_proj(x_tile))

    return TiledMLP.apply(mlp, self, x, int(shards.item()), params)


def _drop_mask_sdpa() -> None:
    """At sp1: give HF's sdpa attention no mask (it is causal), as ALST's wrapper does at sp>1."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def no_mask(module, query, key, value, attention_mask, *args, **kwargs):
        return sdpa(module, query, key, value, None, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = no_mask


class _AlstLM(torch.nn.Module):
    """Body + tiled fused loss as one module, so both run inside the engine's forward."""

    def __init__(self, lm, loss_scale: float):
        super().__init__()
        self.lm = lm
        self.loss_scale = loss_scale
        """world / (tokens of the global batch): the ranks ZeRO averages gradients over, over the
        tokens the loss is a mean over."""

    def _tile_loss(self, _, hidden_tile, targets_tile):
        import torch.nn.functional as F

        logits = self.lm.lm_head(hidden_tile).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets_tile.reshape(-1),
                               reduction="sum") * self.loss_scale

    def forward(self, tokens, positions, targets):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

        hidden = self.lm.model(input_ids=tokens, position_ids=positions).last_hidden_state
        shards = torch.tensor(math.ceil(hidden.shape[1] / TILE_TOKENS))
        dist.all_reduce(shards, op=dist.ReduceOp.MAX)
        return TiledFusedLogitsLoss.apply(self._tile_loss, self, hidden, targets, None,
                                          int(shards.item()), [self.lm.lm_head.weight], "sum")


def alst_config(global_batch: int, dp: int, grad_clip: float) -> dict:
    """ZeRO-3, fp32, torch optimizer, no offload (CPU backend: same RAM)."""
    return {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": global_batch // dp, "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def alst_worker(rank: int, world: int, sp: int, seq_len: int, steps: int, cfg: dict) -> dict:
    """One rank of ALST at sequence-parallel degree `sp` (dp = world / sp). `cfg`: the peers'
    shape, seed, lr, betas, eps, global batch and grad clip."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    import deepspeed.ops
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.models.llama import modeling_llama

    from disttrain.data import build_batches
    from disttrain.metrics import peak_rss_bytes

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")  # joins the spawned ranks' process group
    modeling_llama.LlamaMLP.forward = _tiled_mlp_forward
    dp, batch = world // sp, cfg["global_batch"]
    lm = hf_llama(cfg["shape"], cfg["seed"])
    lm.config.use_cache = False
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mpu = None
    if sp > 1:
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            lm, core_attn_implementation="sdpa", sequence_parallel_size=sp, micro_batch_size=1,
            seq_length=seq_len, seq_length_is_variable=False)
    else:
        _drop_mask_sdpa()
    model = _AlstLM(lm, loss_scale=world / (batch * seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=cfg["betas"],
                                  eps=cfg["eps"], weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=mpu,
                                           config=alst_config(batch, dp, cfg["grad_clip"]))
    sp_rank, dp_rank = rank % sp, rank // sp
    local = seq_len // sp
    positions = torch.arange(sp_rank * local, (sp_rank + 1) * local)[None]
    batches, losses, norms, times = build_batches("synthetic", None, vocab_size=cfg["shape"]["vocab_size"],
                                  seq_len=seq_len, micro_batch_size=1, seed=cfg["seed"]), [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        total = torch.zeros(1, dtype=torch.float64)
        for micro in range(batch // dp):
            tokens, targets = batches.get(step, micro * dp + dp_rank)
            part = slice(sp_rank * local, (sp_rank + 1) * local)
            loss = engine(tokens[:, part], positions, targets[:, part])
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
            total += loss.detach().double()
        times.append(time.perf_counter() - t0)
        dist.all_reduce(total)
        losses.append(total.item() / world)
        norms.append(float(engine.get_global_grad_norm()))
    return {"losses": losses, "grad_norms": norms, "step_times": times,
            "peak_rss": peak_rss_bytes(), "tracked_bytes": None}
