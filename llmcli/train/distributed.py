"""Several processes through PyTorch's own engine: torchrun (or srun) sets the ranks, we join.

Launching. `llm pretrain R --nproc N` relaunches itself under `python -m torch.distributed.run`
(torchrun) with N processes on this machine. Several machines: run the same command on each with
`--nnodes M` and where they meet, either

- `--rdzv-endpoint HOST:PORT`: torchrun's c10d rendezvous (HOST is one of the machines, PORT a
  free port on it; ranks are handed out at the rendezvous, so no --node-rank), or
- `--master-addr HOST --master-port PORT --node-rank R`: the static rendezvous (R = 0 .. M-1,
  node 0 being HOST).

`torchrun ... -m llmcli pretrain R` works unchanged, and so does `srun`: when torchrun's
variables (RANK, WORLD_SIZE, LOCAL_RANK) are absent but srun's are (SLURM_PROCID,
SLURM_NTASKS / SLURM_STEP_NUM_TASKS, SLURM_LOCALID, inside a job step), they are taken as the
rank layout; MASTER_ADDR must then be set (e.g. `export MASTER_ADDR=$(scontrol show hostnames
$SLURM_JOB_NODELIST | head -n1)`), MASTER_PORT defaults to 29500. LLM_IGNORE_SLURM=1 turns this
off (an interactive shell inside a multi-task allocation, say).

The launching `llm` passes SIGINT/SIGTERM/SIGHUP on to torchrun (in a session of its own), which
passes them to the workers: they save and stop. Before the workers start (a rendezvous, even
torch's C++ wait for node 0) torchrun stops at once, with 130 (`_watch_signals`). A worker's
error goes to a file for `torchrun_main`, which prints the one that caused the others
(`root_cause`) with its exit code.

Training. NCCL on GPUs, gloo on CPU. Only global rank 0 prints and writes files; every rank
draws its own batches. `train.parallel: ddp` replicates the model (DDP averages gradients);
`fsdp` shards weights, gradients and optimizer state across all processes with FSDP2
(`fully_shard` on every block and on the root), bf16 compute through its mixed-precision policy
when `train.precision` is bf16; checkpoints are then gathered into one full state dict on rank
0, so a checkpoint is the same file whichever way it was trained.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used: the launching process never needs it
    import torch

DEFAULT_MASTER_PORT = 29500
RDZV_ID = "llmcli"  # every node of one run must give torchrun the same id


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def describe(self, parallel: str) -> str:
        """' x N processes (ddp)' for a run's start line; '' for one process, which trains
        plainly (and says so when the recipe asks for fsdp, which it then does not use)."""
        if self.enabled:
            return f" x {self.world_size} processes ({parallel})"
        return " (one process: train.parallel=fsdp unused)" if parallel == "fsdp" else ""


def _env_int(name: str, lo: int, default: int | None = None) -> int:
    """An integer launcher variable, at least `lo`; a missing or malformed one is one line
    naming it (a hand-made environment, a wrapper script's typo)."""
    from llmcli.console import fail

    text = os.environ.get(name, "").strip()
    if not text and default is not None:
        return default
    if not text:
        fail(f"{name} is empty or not set, but the launcher's other variables say this is one "
             f"of several processes; set {name} (an integer from {lo}), or unset them for one "
             "process")
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < lo:
        fail(f"{name}={text!r}: expected an integer from {lo}; fix the launcher's environment "
             "(or unset it for one process)")
    return value


def _checked(info: Dist, rank_name: str, world_name: str) -> Dist:
    """A rank at or beyond the world size would wait forever for processes that never come."""
    from llmcli.console import fail

    if info.rank >= info.world_size:
        fail(f"{rank_name} {info.rank} is not below {world_name} {info.world_size}: ranks go "
             f"from 0 to {info.world_size - 1}; fix the launcher's environment")
    return info


def slurm_layout() -> Dist | None:
    """The rank layout of an `srun` job step when torchrun's variables are absent, else None."""
    env = os.environ
    if "WORLD_SIZE" in env or env.get("LLM_IGNORE_SLURM") == "1":
        return None
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return None
    world_name = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    world = _env_int(world_name, 1, default=1)
    info = Dist(_env_int("SLURM_PROCID", 0), world, _env_int("SLURM_LOCALID", 0, default=0))
    return _checked(info, "SLURM_PROCID", world_name)


def from_env() -> Dist:
    """The rank layout torchrun (or srun) put in the environment (a single process when absent)."""
    world = _env_int("WORLD_SIZE", 1, default=1)
    if world > 1:
        info = Dist(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0, default=0))
        return _checked(info, "RANK", "WORLD_SIZE")
    if "WORLD_SIZE" not in os.environ:
        slurm = slurm_layout()
        if slurm is not None and slurm.enabled:
            return slurm
    return Dist()


def _adopt_slurm(info: Dist) -> None:
    """Write srun's layout as torchrun's variables, which init_process_group (env://) reads."""
    from llmcli.console import fail

    if not os.environ.get("MASTER_ADDR"):
        fail("launched by srun with several tasks but MASTER_ADDR is not set: export "
             "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) (and "
             "optionally MASTER_PORT) before srun, or set LLM_IGNORE_SLURM=1 for one process")
    os.environ.setdefault("MASTER_PORT", str(DEFAULT_MASTER_PORT))
    os.environ["RANK"] = str(info.rank)
    os.environ["WORLD_SIZE"] = str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)


def _check_meeting_point(info: Dist) -> None:
    """WORLD_SIZE and RANK set without torchrun: init_process_group (env://) needs where to
    meet, and waits silently there (for as long as its timeout) until all have joined."""
    from llmcli.console import fail
    from llmcli.console import info as say

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name, "").strip():
            fail(f"WORLD_SIZE={info.world_size} and RANK={info.rank} are set but {name} is "
                 f"not: export MASTER_ADDR=<rank 0's host> MASTER_PORT=<a free port there> in "
                 "every process, launch with `llm ... --nproc N` (or torchrun), or unset "
                 "WORLD_SIZE for one process")
    if info.is_main:
        say(f"meeting at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: waiting for "
            f"all {info.world_size} processes (RANK 0 to {info.world_size - 1}) to join "
            "(Ctrl-C to give up)")


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group (once) and pick this rank's device (cuda:LOCAL_RANK on GPUs)."""
    import torch
    import torch.distributed as dist

    info = from_env()
    if not info.enabled:
        return info, device
    if info.rank != 0:  # one voice: rank 0 reports progress for the whole group
        from llmcli.console import settings

        settings["quiet"] = True
    if "WORLD_SIZE" not in os.environ:
        _adopt_slurm(info)
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # srun, by hand or a launcher of one's own
        _check_meeting_point(info)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return info, device


def current() -> Dist:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def joined() -> bool:
    """Whether this process is in a process group (of any size, one included)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Wrapping the model: DDP, FSDP2, activation checkpointing


def wrap(model: torch.nn.Module, info: Dist, device: torch.device) -> torch.nn.Module:
    """DDP around `model` (itself in a single process)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def fully_shard_model(net: torch.nn.Module, blocks: Iterable[torch.nn.Module], info: Dist,
                      device: torch.device, param_dtype: torch.dtype | None = None
                      ) -> torch.nn.Module:
    """FSDP2 in place: `fully_shard` on each block, then on `net` (the root: embeddings, final
    norm and output layer). Each rank keeps 1/world_size of every parameter, its gradient and
    its AdamW moments; a block's weights are gathered just for its forward and backward.

    `param_dtype` (bf16) computes in that dtype and reduces gradients in fp32; the sharded
    master weights and the optimizer stay fp32. Build the optimizer after this call: the
    parameters are replaced by sharded DTensors.
    """
    import warnings

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The logits the root returns are a view; nothing here changes them in place, which is
    # what this warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # Like DDP: every rank starts from rank 0's weights (each then keeps its own slice).
    with torch.no_grad():
        for tensor in [*net.parameters(), *net.buffers()]:
            dist.broadcast(tensor.data, src=0)
    mesh = init_device_mesh(device.type, (info.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
              if param_dtype is not None else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    return net


def activation_checkpointing(blocks: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """Recompute each block's activations in backward instead of keeping them: memory per block
    drops from its activations to its input, for about one more forward pass of compute. Same
    numbers (the RNG state is replayed, so dropout masks match). Returns the blocks changed;
    `undo_activation_checkpointing` restores them."""
    import torch
    from torch.utils.checkpoint import checkpoint

    changed = []
    for block in blocks:
        if "forward" in vars(block):
            continue
        inner = block.forward

        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        changed.append(block)
    return changed


def undo_activation_checkpointing(blocks: Iterable[torch.nn.Module]) -> None:
    for block in blocks:
        vars(block).pop("forward", None)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on all but the last
    micro-step of gradient accumulation."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Full (consolidated) state under FSDP: every rank calls these; rank 0 gets the tensors


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (an empty dict elsewhere), with tied parameters
    sharing one tensor again, so the file written is the one an unsharded run writes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tensors = {k: _own(v) for k, v in get_model_state_dict(model, options=_full_options()).items()}
    if not tensors:
        return tensors
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in tensors]
        for name in names[1:]:
            if present:
                tensors[name] = tensors[present[0]]
    return tensors


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict as a single process would hold it (parameters numbered in
    the optimizer's order), gathered onto rank 0; {} on the other ranks."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not named:
        return {}
    order: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        ids = []
        for fqn in group["params"]:
            order.setdefault(fqn, len(order))
            ids.append(order[fqn])
        groups.append({**group, "params": ids})
    state = {order[fqn]: {k: _own(v) for k, v in values.items()}
             for fqn, values in named["state"].items() if fqn in order}
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              indexed: dict) -> None:
    """Put a single-process-shaped optimizer state (from `state.optimizer_state_dict`) into an
    optimizer over sharded parameters; each rank keeps its own slice."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = {fqns[int(i)]: values for i, values in indexed["state"].items()}
    groups = [{**group, "params": [fqns[int(i)] for i in group["params"]]}
              for group in indexed["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def _own(value: Any) -> Any:
    """A gathered tensor with a storage of its own: FSDP pads a dimension that does not divide
    by the process count, and the full tensor can be a view into the padded buffer, which
    safetensors refuses to write."""
    import torch

    if not isinstance(value, torch.Tensor):
        return value
    if value.untyped_storage().nbytes() != value.numel() * value.element_size():
        return value.clone(memory_format=torch.contiguous_format)
    return value


class FullWeights:
    """Gathered weights that the checkpoint writers take in place of the model
    (`state_dict()` for whole models, `named_parameters()` for LoRA adapters)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        seen: set[int] = set()
        for name, tensor in self.tensors.items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield name, tensor


# ---------------------------------------------------------------------------------------------
# Collectives


def mean_across(values: torch.Tensor, info: Dist) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself in a single process)."""
    import torch
    import torch.distributed as dist

    if not info.enabled:
        return values
    home = values.device
    # NCCL reduces only CUDA tensors, gloo only CPU ones.
    where = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    values = values.detach().to(where, copy=True)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return (values / info.world_size).to(home)


def gather_objects(obj: object, info: Dist) -> list[object]:
    """Every rank's `obj`, in rank order (for per-rank RNG states in the trainer state)."""
    import torch.distributed as dist

    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def from_main(value: object, info: Dist) -> object:
    """Rank 0's `value` on every rank (the others pass anything): they wait here until rank 0
    has done what only it may do, and take its result."""
    import torch.distributed as dist

    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: Dist) -> None:
    import torch.distributed as dist

    if info.enabled:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Launching under torchrun


@dataclass(frozen=True)
class Launch:
    """How `llm pretrain` / `llm finetune` start their processes (torchrun's settings)."""

    nproc: int = 1  # processes on this machine
    nnodes: int = 1  # machines
    node_rank: int | None = None  # this machine's place (static rendezvous only)
    rdzv_endpoint: str | None = None  # HOST:PORT of torchrun's c10d rendezvous
    master_addr: str | None = None  # static rendezvous: node 0's address
    master_port: int | None = None

    @property
    def needed(self) -> bool:
        """Whether the command must relaunch itself under torchrun."""
        return (self.nproc > 1 or self.nnodes > 1 or self.rdzv_endpoint is not None
                or self.master_addr is not None)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def check(self) -> None:
        """One-line errors for settings torchrun would reject or hang on."""
        from llmcli.console import fail

        if self.rdzv_endpoint is not None and (self.master_addr is not None
                                               or self.master_port is not None):
            fail("--rdzv-endpoint and --master-addr/--master-port are two ways to meet: give "
                 "one (--rdzv-endpoint HOST:PORT is simpler)")
        if self.rdzv_endpoint is not None:
            host, sep, port = self.rdzv_endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                fail(f"--rdzv-endpoint {self.rdzv_endpoint!r}: expected HOST:PORT, e.g. "
                     "node0.example.org:29400 (a free port on one of the machines)")
            if self.node_rank is not None:
                fail("--node-rank goes with --master-addr (static rendezvous); with "
                     "--rdzv-endpoint the machines get their ranks at the rendezvous")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            fail(f"--master-port {self.master_port}: expected a port 1 to 65535")
        if self.master_port is not None and self.master_addr is None:
            fail("--master-port needs --master-addr (node 0's address)")
        if self.nnodes > 1 and self.rdzv_endpoint is None and self.master_addr is None:
            fail(f"--nnodes {self.nnodes}: say where the machines meet: --rdzv-endpoint "
                 "HOST:PORT (HOST one of them, PORT free there), or --master-addr HOST "
                 "--master-port PORT --node-rank R")
        if self.master_addr is not None and self.nnodes > 1 and self.node_rank is None:
            fail(f"--master-addr with --nnodes {self.nnodes} needs --node-rank (0 on "
                 f"{self.master_addr}, then 1 to {self.nnodes - 1} on the others)")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            fail(f"--node-rank {self.node_rank}: expected 0 to {self.nnodes - 1} "
                 f"(--nnodes {self.nnodes})")

    def check_master_port(self) -> None:
        """The static rendezvous's port must be free on node 0, which listens on it: refused
        before launching, not as torchrun's traceback (a port in use on another machine is
        torchrun's to find)."""
        from llmcli.console import fail

        if self.master_addr is None or (self.node_rank or 0) != 0:
            return
        port = self.master_port or DEFAULT_MASTER_PORT
        if port_in_use(self.master_addr, port):
            fail(f"--master-port {port}: in use on {self.master_addr}; pick a free port")

    def say_where_they_meet(self) -> None:
        """A rendezvous waits (silently, in torchrun) until every process has joined."""
        from llmcli.console import info

        if self.rdzv_endpoint is not None:
            where = f"{self.rdzv_endpoint} (torchrun's c10d rendezvous)"
        elif self.master_addr is not None:
            where = f"{self.master_addr}:{self.master_port or DEFAULT_MASTER_PORT}"
        else:
            return
        info(f"meeting at {where}: waiting for all {self.world_size} processes "
             f"({self.nnodes} machine(s)) to join (Ctrl-C to give up)")

    def torchrun_args(self) -> list[str]:
        """torchrun's own arguments (what goes between `torch.distributed.run` and the
        program)."""
        args = [f"--nproc-per-node={self.nproc}"]
        if self.rdzv_endpoint is not None:
            return [f"--nnodes={self.nnodes}", *args, "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={self.rdzv_endpoint}",
                    f"--rdzv-id={os.environ.get('LLM_RDZV_ID', RDZV_ID)}"]
        if self.master_addr is not None:
            return [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank or 0}", *args,
                    f"--master-addr={self.master_addr}",
                    f"--master-port={self.master_port or DEFAULT_MASTER_PORT}"]
        return ["--standalone", *args]


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on `port` at `host`, a local address (False when `host` is
    another machine's, or unknown: nothing to tell here)."""
    import errno
    import socket

    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--master-addr",
                  "--master-port")


def strip_launch_options(argv: list[str]) -> list[str]:
    """`argv` without the launching options (and their values): what each worker runs."""
    cleaned, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{opt}=" for opt in LAUNCH_OPTIONS)):
            cleaned.append(arg)
    return cleaned


def relaunch_under_torchrun(launch: Launch | int, argv: list[str] | None = None) -> None:
    """Run this same command (without the launching options) under torchrun, then exit with
    its code: the one way `llm pretrain` and `llm finetune` go multi-process."""
    from llmcli.console import fail

    if isinstance(launch, int):
        launch = Launch(nproc=launch)
    launch.check()
    if from_env().enabled:
        fail("--nproc/--nnodes are for launching; under torchrun or srun already "
             f"({from_env().world_size} processes), drop them")
    launch.check_master_port()
    cleaned = strip_launch_options(sys.argv[1:] if argv is None else argv)
    sys.exit(relaunch(launch, cleaned))


def torchrun_command(launch: Launch | int, argv: list[str]) -> list[str]:
    """The command line that runs `llm <argv>` under torchrun."""
    if isinstance(launch, int):
        launch = Launch(nproc=launch)
    return [sys.executable, "-c", "from llmcli.train.distributed import torchrun_main; "
            "torchrun_main()", *launch.torchrun_args(), "-m", "llmcli", *argv]


# The process id of the `llm` that started torchrun.
LAUNCHER_PID_ENV = "LLM_LAUNCHER_PID"
# Signals the launching `llm` passes on to torchrun, which passes them on to the workers.
PASSED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def torchrun_main() -> None:
    """torchrun itself, speaking as one command: a failed group ends with one line (the error
    that caused the others, see `root_cause`) and that worker's exit code; Ctrl-C or SIGTERM
    (passed on to the workers, which save a checkpoint and say so) with 130; never torchrun's
    traceback and exit 1."""
    import shutil
    import tempfile

    from llmcli.console import WORKER_ERRORS_ENV, run_guarded, settings

    argv = sys.argv[1:]
    settings["debug"] = "--debug" in argv
    errors = tempfile.mkdtemp(prefix="llm-workers-")
    stop_watching = _answer_signals(lambda: shutil.rmtree(errors, ignore_errors=True))
    _follow_parent()
    os.environ[WORKER_ERRORS_ENV] = errors
    try:
        run_guarded(lambda: _torchrun(argv, errors))
    finally:
        stop_watching()
        os.environ.pop(WORKER_ERRORS_ENV, None)
        shutil.rmtree(errors, ignore_errors=True)


def _torchrun(argv: list[str], errors: str) -> None:
    import signal

    with _quiet_cpp_log("--debug" not in argv):
        import torch  # noqa: F401  (reads TORCH_CPP_LOG_LEVEL once, here)
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import main

    from llmcli.console import EXIT_INTERRUPTED, fail

    if "--debug" not in argv:
        _quiet_launcher_logs()
    try:
        # logs in the folder torchrun_main removes: by default every run left a torchelastic_*
        # tree of empty folders in the temporary folder
        main([f"--log-dir={os.path.join(errors, 'logs')}", *argv])
    except SignalException as exc:
        passed = exc.sigval in (signal.SIGINT, signal.SIGTERM)
        sys.exit(EXIT_INTERRUPTED if passed else 128 + int(exc.sigval))
    except ChildFailedError as exc:
        message, code = root_cause(exc.failures, errors)
        if message is None:
            sys.exit(code)
        fail(message, code)
    except (DistError, RendezvousError) as exc:
        fail(meeting_problem(argv, exc))


@contextlib.contextmanager
def _quiet_cpp_log(quiet: bool) -> Iterator[None]:
    """Import torch in torchrun with its C++ log at fatal errors only (a rendezvous that cannot
    reach node 0 logs every retry, and the last error, with pages of stack frames; torchrun_main
    says what failed in one line), unless the user set TORCH_CPP_LOG_LEVEL. The variable is
    unset again before the workers start, so that their log stays as it is."""
    name = "TORCH_CPP_LOG_LEVEL"
    ours = quiet and name not in os.environ
    if ours:
        os.environ[name] = "FATAL"
    try:
        yield
    finally:
        if ours:
            os.environ.pop(name, None)


def _quiet_launcher_logs() -> None:
    """torchrun's log lines ("failed (exitcode: 2)", "Sending process ... closing signal"):
    the workers and torchrun_main say what happened, once (--debug keeps them). Its C++ log
    (a TCPStore's retries, with stack frames) is quieted by _quiet_cpp_log."""
    import logging

    # the rendezvous backends are imported when one is chosen, and each module's logger then
    # gets its level from torch (LOGLEVEL, default WARNING): make them now, to quiet them too
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend  # noqa: F401
    import torch.distributed.elastic.rendezvous.static_tcp_rendezvous  # noqa: F401

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


# How long the main thread has to answer a Ctrl-C or SIGTERM itself before the watcher ends
# the process (it cannot while torch's C++ code waits for node 0, see _watch_signals)
SIGNAL_GRACE_S = 1.0


def _answer_signals(cleanup: Callable[[], None] = lambda: None) -> Callable[[], None]:
    """Ctrl-C and SIGTERM end torchrun while it waits for the others to join (a rendezvous):
    it installs its own handlers only once the workers start, and an `llm` started in the
    background hands it SIGINT ignored, as a shell does to background jobs. Returns what to
    call once the main thread is ending (see _watch_signals)."""
    import signal

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupted)
    return _watch_signals(interrupted, cleanup)


def _watch_signals(ours: Callable[[int, object], None],
                   cleanup: Callable[[], None]) -> Callable[[], None]:
    """A Python handler runs only between bytecodes of the main thread, and torch's TCPStore
    (the static rendezvous's wait for node 0) retries its connect in C++ through every signal
    for 15 minutes: a thread woken by the signal's byte (set_wakeup_fd) ends the process if the
    main thread has not within SIGNAL_GRACE_S. Only before the workers start (our SIGTERM
    handler still in place, nothing written yet); afterwards torchrun's handlers pass the
    signal to the workers, which save and stop. `cleanup` runs before such an end; the function
    returned stops the watcher (the main thread is ending and says so itself)."""
    import signal

    ending = threading.Event()
    read, write = os.pipe()
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    wanted = {int(signal.SIGINT), int(signal.SIGTERM)}

    def watch() -> None:
        with open(read, "rb", buffering=0) as pipe:
            while not ending.is_set():
                got = pipe.read(64)
                if not got:  # stop() closed the other end
                    return
                if not wanted & set(got):
                    continue
                if ending.wait(SIGNAL_GRACE_S):
                    return
                if signal.getsignal(signal.SIGTERM) is not ours:  # torchrun's: workers run
                    continue
                from llmcli.console import EXIT_INTERRUPTED, say_interrupted

                cleanup()
                say_interrupted()
                sys.stderr.flush()
                os._exit(EXIT_INTERRUPTED)

    def stop() -> None:
        ending.set()
        signal.set_wakeup_fd(previous)
        os.close(write)  # the watcher reads the end of the pipe, and returns

    threading.Thread(target=watch, name="llm-signals", daemon=True).start()
    return stop


def _follow_parent() -> None:
    """torchrun gets SIGTERM when the `llm` that started it dies without passing a signal on
    (kill -9, out of memory): its workers then save and stop instead of training on as
    orphans that hold the run directory (Linux)."""
    import signal

    parent = os.environ.pop(LAUNCHER_PID_ENV, "")
    if not sys.platform.startswith("linux") or not parent.isdigit():
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the line above
        sys.exit(1)


def root_cause(failures: dict[int, Any], errors: str) -> tuple[str | None, int]:
    """The one line (None: a worker said it already) and exit code a failed group ends with,
    from torchrun's failures (rank -> exit code, pid) and the workers' records. In order: the
    lowest rank's own error; a worker killed by a signal other than SIGTERM; an interrupt
    (the workers saved and stopped); a worker killed by SIGTERM (torchrun ends the others so,
    once one has failed); what a worker said about losing the others; an exit code."""
    import json
    import signal

    from llmcli.console import EXIT_FAILURE, EXIT_INTERRUPTED

    records: dict[int, dict[str, Any]] = {}
    for rank in failures:
        path = os.path.join(errors, f"rank{rank}.json")
        with contextlib.suppress(OSError, ValueError), open(path, encoding="utf-8") as fh:
            records[rank] = json.load(fh)
    codes = {r: f.exitcode for r, f in failures.items()}
    told = sorted(r for r, record in records.items()
                  if not record.get("peer_lost") and record.get("code") != EXIT_INTERRUPTED)
    if told:
        return str(records[told[0]]["message"]), int(records[told[0]]["code"])
    killed = sorted((code == -signal.SIGTERM, r) for r, code in codes.items() if code < 0)
    saved = any(record.get("code") == EXIT_INTERRUPTED for record in records.values())
    if killed and not killed[0][0]:
        return _killed(killed[0][1], failures[killed[0][1]], saved), EXIT_FAILURE
    stopped = sorted({r for r, code in codes.items() if code == EXIT_INTERRUPTED}
                     | {r for r, record in records.items() if record["code"] == EXIT_INTERRUPTED})
    if stopped:
        if any(record.get("said") for record in records.values()):
            return None, EXIT_INTERRUPTED
        return (f"rank {stopped[0]} was interrupted; the other processes stopped with it",
                EXIT_INTERRUPTED)
    if killed:
        return _killed(killed[0][1], failures[killed[0][1]], saved), EXIT_FAILURE
    if records:
        first = records[min(records)]
        return str(first["message"]), int(first["code"])
    rank = min(codes)
    return (f"rank {rank} (process {failures[rank].pid}) failed with exit code {codes[rank]}",
            codes[rank] if 0 < codes[rank] < 256 else EXIT_FAILURE)


def _killed(rank: int, failure: Any, saved: bool) -> str:
    """A killed worker ends the group; the others were told to save first (torchrun's SIGTERM)
    but cannot without it (every save is collective): say which happened."""
    name = failure.signal_name()
    hint = " (out of memory? or killed by hand)" if name == "SIGKILL" else ""
    ending = ("after saving a checkpoint (continue with the same command plus --resume)"
              if saved else "without saving: --resume continues from the newest checkpoint "
              "saved before")
    return (f"rank {rank} (process {failure.pid}) was killed by {name}{hint}; the other "
            f"processes stopped with it, {ending}")


def meeting_problem(argv: list[str], exc: BaseException) -> str:
    """One line for a rendezvous that failed: the address given, and what to do."""
    import errno as errnos

    from llmcli.console import first_line

    given = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    text = first_line(exc)
    busy = "EADDRINUSE" in text or f"errno: {errnos.EADDRINUSE}" in text
    if "master-port" in given:
        where = f"--master-port {given['master-port']}"
        if busy:
            return (f"{where}: in use on {given.get('master-addr', 'this machine')}; pick a free "
                    "port")
        return (f"{where} on {given.get('master-addr')}: the processes could not meet there "
                f"({text}); check the address and port")
    if "rdzv-endpoint" in given:
        return (f"--rdzv-endpoint {given['rdzv-endpoint']}: the processes could not meet there "
                f"({text}); check that HOST:PORT is one of the machines and the port is free")
    return f"the processes could not meet ({text})"


def relaunch(launch: Launch | int, argv: list[str]) -> int:
    """Run `llm <argv>` under torchrun; returns its exit code. torchrun runs in a session of
    its own, and the signals this process gets (a Ctrl-C, `kill`, a scheduler's SIGTERM) are
    passed on to it, and by it to the workers, once each: they finish the step, save and
    stop, as a single process does."""
    if isinstance(launch, int):
        launch = Launch(nproc=launch)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc)))
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    launch.say_where_they_meet()
    proc = subprocess.Popen(torchrun_command(launch, argv), env=env,
                            start_new_session=os.name == "posix")
    with _passing_signals(proc):
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # no handler to pass it on (not the main thread)
                continue
    return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + N


@contextlib.contextmanager
def _passing_signals(proc: subprocess.Popen) -> Iterator[None]:
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def pass_on(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    sigs = [getattr(signal, name) for name in PASSED_SIGNALS if hasattr(signal, name)]
    previous = {sig: signal.signal(sig, pass_on) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
