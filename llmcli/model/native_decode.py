"""Batch-1 decoding steps in native code: the same model, 1.6-3x faster on CPU.

Decoding one sequence reads every weight once per token, so memory bandwidth bounds it. Through
PyTorch it ran at about half that bound or less (55 % in fp32, 40 % in bf16 at this machine's
lower bandwidth level, benchmarks/bench_generate.py): the library matrix-vector kernels read the
weights slower than a plain streaming read does, and each block costs some twenty dispatches.
`native_decode.cpp` runs a whole step (embedding to logits) in one call and one parallel
region, with kernels that stream each weight row, on the model's own weights and KV cache, and
gives the greedy choice of the logits it computes: the greedy loop reaches 88-92 % of the bound
at this machine's lower bandwidth level, 74-79 % at its higher one (fp32-bf16).

On Linux it is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`; OpenMP,
tuned for this CPU) into `~/.cache/llmcli/native/` (`$XDG_CACHE_HOME` honoured), keyed by the
source, the compiler and the CPU. Without a compiler, or with `LLM_NATIVE_DECODE=0`, decoding
stays in PyTorch. Tests hold it to the PyTorch model's logits for every architecture option.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from llmcli.files import atomic_path, cache_dir

SOURCE = Path(__file__).with_name("native_decode.cpp")
LAYER_SLOTS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
               "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
               "ffn.fc_in.weight", "ffn.fc_in.bias", "ffn.fc_gate.weight", "ffn.fc_gate.bias",
               "ffn.fc_out.weight", "ffn.fc_out.bias")
ACTIVATIONS = {"relu": 0, "gelu": 1, "swiglu": 2}
POSITIONS = {"sinusoidal": 0, "learned": 1, "rope": 2}


class Spec(ctypes.Structure):
    """The C++ side's `Spec`: sizes, options and pointers to the model's tensors."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("d_model", "heads", "ffn", "vocab", "layers", "max_len")] + [
        (name, ctypes.c_int32) for name in
        ("bf16", "rmsnorm", "activation", "positions", "threads", "unused")] + [
        ("eps", ctypes.c_float), ("unused2", ctypes.c_float)] + [
        (name, ctypes.c_void_p) for name in
        ("tok_emb", "pos", "rope_sin", "norm_w", "norm_b", "head_w", "head_b", "layer", "k",
         "v", "scratch")]


class Pick(ctypes.Structure):
    """The C++ side's `Pick`: a greedy choice, or ok = 0 where torch must answer."""

    _fields_ = [("index", ctypes.c_int64), ("logprob", ctypes.c_float), ("ok", ctypes.c_int32)]


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines()
                 if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled step, built on first use; None where it cannot be (no compiler, switched
    off, a failed build), and decoding stays in PyTorch."""
    if os.environ.get("LLM_NATIVE_DECODE", "1") == "0" or platform.system() != "Linux":
        return None
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        return None
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(flags),
                                        _cpu_signature()]).encode()).hexdigest()[:16]
        target = cache_dir("native") / f"decode-{key}.so"
        if not target.exists():
            with atomic_path(target) as built:  # whole or not at all, even built concurrently
                subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], check=True,
                               capture_output=True, timeout=300)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    lib.llm_decode_step.argtypes = [ctypes.POINTER(Spec), ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.POINTER(Pick)]
    lib.llm_decode_step.restype = ctypes.c_int
    lib.llm_greedy_pick.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                    ctypes.POINTER(ctypes.c_int64),
                                    ctypes.POINTER(ctypes.c_float)]
    lib.llm_greedy_pick.restype = ctypes.c_int
    return lib


class NativeDecoder:
    """Steps one sequence through a model on its KV cache, as `model(token, cache=cache)` does
    (the cache advances by one), returning the (1, vocab) fp32 logits."""

    def __init__(self, model: torch.nn.Module, lib: ctypes.CDLL):
        cfg = model.cfg
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        self.lib = lib
        self.dtype = model.tok_emb.weight.dtype
        self.context_length = int(cfg.context_length)
        self.cache_shape = (cfg.num_blocks, 1, cfg.num_heads, self.context_length,
                            cfg.d_model // cfg.num_heads)
        self.keep: list[torch.Tensor] = []  # every tensor the pointers refer to
        self._index, self._logprob = ctypes.c_int64(), ctypes.c_float()  # pick's answers
        self._pick = Pick()  # the step's own greedy choice
        self._pick_ref = ctypes.byref(self._pick)
        self._checked: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._picked: tuple[torch.Tensor, int, float] | None = None  # logits, index, log p

        def ptr(tensor: torch.Tensor | None) -> int | None:
            if tensor is None:
                return None
            self.keep.append(tensor)
            return tensor.data_ptr()

        slots = [ptr(params.get(f"blocks.{i}.{name}")) for i in range(cfg.num_blocks)
                 for name in LAYER_SLOTS]
        self.layer_table = (ctypes.c_void_p * len(slots))(*slots)
        d, ffn = cfg.d_model, cfg.ffn_width
        self.scratch = torch.empty(5 * d + ffn + cfg.num_heads * self.context_length)
        positions = cfg.positions
        pos = {"sinusoidal": buffers.get("pos_table"), "rope": buffers.get("rope_cos"),
               "learned": params.get("pos_emb.weight")}[positions]
        self.spec = Spec(
            d_model=d, heads=cfg.num_heads, ffn=ffn, vocab=int(cfg.vocab_size),
            layers=cfg.num_blocks, max_len=self.context_length,
            bf16=int(self.dtype == torch.bfloat16), rmsnorm=int(cfg.norm == "rmsnorm"),
            activation=ACTIVATIONS[cfg.activation], positions=POSITIONS[positions],
            threads=1, eps=cfg.norm_eps, tok_emb=ptr(model.tok_emb.weight), pos=ptr(pos),
            rope_sin=ptr(buffers.get("rope_sin")), norm_w=ptr(params["norm.weight"]),
            norm_b=ptr(params.get("norm.bias")), head_w=ptr(model.lm_head.weight),
            head_b=ptr(params.get("lm_head.bias")),
            layer=ctypes.cast(self.layer_table, ctypes.c_void_p), scratch=ptr(self.scratch))
        self._spec_ref = ctypes.byref(self.spec)

    def step(self, token: int, cache) -> torch.Tensor:
        pos = cache.length
        k, v = cache.k, cache.v
        if k is not self._checked[0] or v is not self._checked[1]:  # once per cache tensor
            if not all(t.is_contiguous() and t.dtype == self.dtype and t.shape == self.cache_shape
                       and t.device.type == "cpu" for t in (k, v)):
                raise ValueError("the native step needs a contiguous batch-1 cache of the "
                                 "model's dtype and context length")
            self.spec.k, self.spec.v = k.data_ptr(), v.data_ptr()
            self._checked = (k, v)
        self.spec.threads = torch.get_num_threads()
        logits = torch.empty(1, self.spec.vocab)
        self._picked = None
        status = self.lib.llm_decode_step(self._spec_ref, token, pos, logits.data_ptr(),
                                          self._pick_ref)
        if status == 1:
            raise ValueError(f"token id {token} is outside the model's vocabulary "
                             f"({self.spec.vocab})")
        if status == 2:
            raise ValueError(f"sequence of {pos + 1} tokens exceeds context_length "
                             f"{self.context_length}")
        cache.length = pos + 1
        if self._pick.ok:
            self._picked = (logits, self._pick.index, self._pick.logprob)
        return logits

    def pick(self, logits: torch.Tensor) -> tuple[int, float] | None:
        """The greedy token of one row of logits and its log-probability, as torch's argmax and
        logsumexp give them. For the logits the last step returned, as it returned them (the
        same tensor, unchanged: decoding changes logits out of place), the step already has it;
        for others, one native pass takes about a tenth of torch's time (17 against 165 us at a
        vocabulary of 100,256). None where torch must answer: a NaN or +inf logit, every logit
        -inf, or a tensor this cannot read."""
        if self._picked is not None and self._picked[0] is logits:
            return self._picked[1], self._picked[2]
        if not (logits.dim() == 2 and logits.shape[0] == 1 and logits.dtype == torch.float32
                and logits.is_contiguous() and logits.device.type == "cpu"):
            return None
        status = self.lib.llm_greedy_pick(logits.data_ptr(), logits.shape[1],
                                          torch.get_num_threads(), ctypes.byref(self._index),
                                          ctypes.byref(self._logprob))
        return None if status else (self._index.value, self._logprob.value)


def native_decoder(model: torch.nn.Module) -> NativeDecoder | None:
    """A native stepper for `model` when it can take one (a llmcli GPT in eval mode on CPU, fp32
    or bf16, every tensor contiguous, plain linear layers: no unmerged adapters), else None."""
    from llmcli.model.fast_decode import OneDNNLinear
    from llmcli.model.gpt import GPT

    if not isinstance(model, GPT) or model.training:
        return None
    tensors = [*model.parameters(), *model.buffers()]
    dtype = model.tok_emb.weight.dtype
    if any(t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous()
           for t in tensors) or dtype not in (torch.float32, torch.bfloat16):
        return None
    linears = (torch.nn.Linear, OneDNNLinear)
    if any(isinstance(m, torch.nn.Linear) and type(m) not in linears for m in model.modules()):
        return None
    known = {f"blocks.{i}.{name}" for i in range(model.cfg.num_blocks) for name in LAYER_SLOTS}
    known |= {"tok_emb.weight", "pos_emb.weight", "norm.weight", "norm.bias", "lm_head.weight",
              "lm_head.bias"}
    if not {name for name, _ in model.named_parameters()} <= known:
        return None  # a layer this step does not know about
    if model.cfg.positions == "rope" and (model.cfg.d_model // model.cfg.num_heads) % 2:
        return None  # RoPE rotates pairs (recipes refuse an odd head width with it)
    lib = library()
    return None if lib is None else NativeDecoder(model, lib)
