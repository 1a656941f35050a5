"""`train.adam_betas` / `train.adam_eps` reach both optimizers (torch AdamW and ZeRO's), and
the two agree step for step with torch's AdamW at the same settings."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from conftest import TINY_JOB, merge
from disttrain.engine import build_runtime
from disttrain.parallel.zero import ZeroConfig, ZeroModelStates
from disttrain.spec import job_from_dict
from planner.search import plan_job
from disttrain.model import build_model

BETAS, EPS, LR = (0.8, 0.99), 1e-6, 1e-2


def _job():
    return job_from_dict(merge(TINY_JOB, {"train": {"adam_betas": list(BETAS), "adam_eps": EPS}}))


def test_spec_settings_reach_both_optimizers():
    job = _job()
    assert job.spec.train.adam_betas == BETAS and job.spec.train.adam_eps == EPS
    plan = plan_job(job.plan_request())
    runtime = build_runtime(job, plan)
    group = runtime.states.optimizer.param_groups[0]
    assert tuple(group["betas"]) == BETAS and group["eps"] == EPS
    zero_plan = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, zero_stage=1))
    zero = build_runtime(job, zero_plan)
    assert isinstance(zero.states, ZeroModelStates)
    assert zero.states.config.betas == BETAS and zero.states.config.eps == EPS


def test_zero_adamw_matches_torch_at_custom_betas():
    shape = _job().shape
    torch.manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (1, 32))
    ref = build_model(shape, seed=0)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    model = build_model(shape, seed=0)
    states = ZeroModelStates(model, ZeroConfig(stage=1, betas=BETAS, eps=EPS, weight_decay=0.0))
    for _ in range(3):
        for m in (ref, model):
            F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step(), opt.zero_grad()
        states.finish_backward(), states.step(LR)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
