"""Everything a resumed run needs to continue exactly, flattened to tensors + JSON.

Safetensors holds only tensors, so the optimizer's moments, the RNG states of torch, numpy and
Python, and the batch sampler's generators become named tensors; the small non-tensor parts
(param groups, counters) travel as JSON metadata. Nothing here pickles.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from llmcli.console import fail
from llmcli.data.batches import torch_seed


def optimizer_state(optimizer: torch.optim.Optimizer | None,
                    sd: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state as named tensors (`optim.<index>.<key>`, index = the parameter's
    place in the optimizer) + JSON. `sd` is a state dict of that shape gathered elsewhere (FSDP:
    `distributed.full_optimizer_state`); DDP, FSDP and single-process runs write the same
    format, so a run can resume under another."""
    sd = optimizer.state_dict() if sd is None else sd
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict, where: str) -> None:
    optimizer.load_state_dict(optimizer_state_dict(optimizer, tensors, meta, where))


def optimizer_state_dict(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict, where: str) -> dict[str, Any]:
    """The optimizer state dict stored by `optimizer_state`, checked against `optimizer`: a
    moment of another shape would be taken and broadcast, and the loss turn NaN. The group
    settings are this optimizer's (`llmcli.checkpoint.load_trainer_state` checked the rest)."""
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g["params"]) for g in meta["param_groups"]]
    if ours != theirs:
        fail(f"{where}: the optimizer state covers {theirs} parameters per group but this model "
             f"trains {ours}; resume with the same recipe (model and lora sections) as the run")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            want = tuple(params[int(index)].shape)
            if key != "step" and tuple(value.shape) != want:
                fail(f"{where}: trainer state tensor {name} has shape {tuple(value.shape)}, but "
                     f"its parameter has {want}; the file was altered or belongs to another "
                     "model: resume with the run's recipe, or from another checkpoint")
            state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states (torch CPU and CUDA, numpy, Python)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, py_gauss = random.getstate()
    tensors["rng.python"] = torch.tensor(internal, dtype=torch.int64)
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, py_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")),
                  key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k].to(torch.uint8) for k in cuda]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, gauss = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, gauss))
    version, py_gauss = meta["python"]
    internal = tuple(int(v) for v in tensors["rng.python"].tolist())
    random.setstate((version, internal, py_gauss))


def seed_everything(seed: int) -> None:
    """Seed torch (CUDA included), numpy and Python; `seed` may be any derived value (seed +
    rank + 1_000_003 * step ...): it is reduced as torch reads it (`torch_seed`)."""
    seed = torch_seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
