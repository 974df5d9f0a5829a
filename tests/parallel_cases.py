"""Bodies of the multi-process tests; run on every rank by tests/distributed.py."""
from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_prolong.config import load_config, validate
from megatron_prolong.training.parallel import destroy_model_parallel, init_distributed, init_model_parallel
from megatron_prolong.training.step import setup_training, train_step
from megatron_prolong.training.weights import load_model_weights, save_model_weights


def synthetic_packed_rows(n: int, seq_length: int, vocab: int, seed: int) -> list[dict]:
    """Packed rows with random document boundaries; no loss across a boundary."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (seq_length,), generator=g)
        cuts = sorted(torch.randperm(seq_length - 1, generator=g)[:3].add(1).tolist())
        cu = torch.tensor([0, *cuts, seq_length], dtype=torch.int32)
        labels = torch.roll(tokens, -1)
        loss_mask = torch.ones(seq_length)
        loss_mask[cu[1:].long() - 1] = 0  # last token of each document predicts nothing
        rows.append(dict(tokens=tokens[None], labels=labels[None], loss_mask=loss_mask[None],
                         cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max())))
    return rows


def setup_from_shared_weights(cfg, runtime, weights_dir: str, first: bool):
    """This layout's groups, model and optimizer, all starting from one set of weights: the
    first layout saves its random initialisation, later layouts load it (resharded)."""
    layout = validate(cfg, runtime.world_size)
    init_model_parallel(layout, cfg.training.seed)
    state = setup_training(cfg, runtime, layout)
    (save_model_weights if first else load_model_weights)(state.model, weights_dir)
    return layout, state


def losses_across_layouts(layouts, steps, overrides, weights_dir):
    """Train from the same weights under each (tp, pp) layout; return the per-step losses."""
    rt = init_distributed("cpu")
    results = {}
    base = load_config(None, overrides)
    batches = [synthetic_packed_rows(base.training.global_batch_size, base.training.seq_length,
                                     base.model.vocab_size, seed=100)] * steps  # same batch: loss must fall
    for i, (tp, pp) in enumerate(layouts):
        cfg = load_config(None, overrides + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"])
        layout, state = setup_from_shared_weights(cfg, rt, weights_dir, first=i == 0)
        dp_rank = parallel_state.get_data_parallel_rank()
        per_rank = layout.num_microbatches
        losses = []
        for step in range(steps):
            mine = batches[step][dp_rank * per_rank:(dp_rank + 1) * per_rank]
            losses.append(train_step(state, mine).loss)
        results[(tp, pp)] = losses
        destroy_model_parallel()
    return results


def fresh_model_across_layouts(layouts, overrides, weights_dir):
    """Each layout builds its model from the recipe's seed alone (no shared weights file) and
    saves it, then takes one training step on the same batch. Finally the (1, 1) model loads
    every layout's save (dist_checkpointing gathers the shards) and compares it, tensor by
    tensor, with its own fresh initialisation. Returns {layout: (step-1 loss, gradient norm)},
    {layout: {tensor: max abs difference}} and the fresh tensors' standard deviations."""
    rt = init_distributed("cpu")
    base = load_config(None, overrides)
    batch = synthetic_packed_rows(base.training.global_batch_size, base.training.seq_length,
                                  base.model.vocab_size, seed=100)
    losses = {}
    for tp, pp in layouts:
        cfg = load_config(None, overrides + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"])
        layout = validate(cfg, rt.world_size)
        init_model_parallel(layout, cfg.training.seed)
        state = setup_training(cfg, rt, layout)
        save_model_weights(state.model, f"{weights_dir}/{tp}x{pp}")
        per_rank = layout.num_microbatches
        dp_rank = parallel_state.get_data_parallel_rank()
        result = train_step(state, batch[dp_rank * per_rank:(dp_rank + 1) * per_rank])
        losses[(tp, pp)] = (result.loss, result.grad_norm)
        destroy_model_parallel()
    cfg = load_config(None, overrides)
    layout = validate(cfg, rt.world_size)
    init_model_parallel(layout, cfg.training.seed)
    state = setup_training(cfg, rt, layout)
    fresh = {k: v.detach().clone() for k, v in state.model[0].module.state_dict().items()
             if torch.is_tensor(v)}
    differences = {}
    for tp, pp in layouts:
        load_model_weights(state.model, f"{weights_dir}/{tp}x{pp}")
        loaded = state.model[0].module.state_dict()
        differences[(tp, pp)] = {k: (loaded[k] - v).abs().max().item() for k, v in fresh.items()}
    destroy_model_parallel()
    return losses, differences, {k: v.std().item() for k, v in fresh.items()}
